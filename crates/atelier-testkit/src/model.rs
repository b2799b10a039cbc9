//! A scripted OpenAI-compatible model server: what a real agent (OpenCode inside a
//! VM) talks to in tests instead of a hosted model.
//!
//! It answers `POST {base}/chat/completions`, streaming (`"stream": true`: Server-Sent
//! Events of `chat.completion.chunk` objects, then `data: [DONE]`) or not (one
//! `chat.completion` object), and `GET {base}/models`.
//!
//! The server is stateless about conversations, as measured with OpenCode 1.18.33: a
//! request without `tools` is title generation (answered with [`Script::title`]);
//! otherwise the step is the number of assistant messages carrying `tool_calls` after
//! the last user message, and the step-th answering turn of the [`Script`] is played.
//! So a script reads as "the reply to each user prompt": tool-call turns, then a final
//! text turn. [`Turn::Error`] turns fail the next requests of their step (a number of
//! times) before the step's answering turn is played, which is how retries are tested.
//!
//! Every request is recorded ([`ModelServer::requests`]) and announced
//! ([`ModelServer::wait_requests`], [`ModelServer::subscribe`]) so tests can assert
//! "the model was asked" and read what it was sent, and benchmarks can time the first
//! request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::watch;

/// The model id the server reports when a request names none.
pub const DEFAULT_MODEL: &str = "scripted";

/// One tool call the model makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool's name (`bash`, `read`, ...).
    pub name: String,
    /// Its arguments, sent as a JSON string as OpenAI does.
    pub arguments: Value,
}

impl ToolCall {
    /// A call of `name` with `arguments`.
    pub fn new(name: impl Into<String>, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments,
        }
    }
}

/// One scripted model answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    /// A text answer, `finish_reason: "stop"`.
    Text(String),
    /// Optional text, then tool calls, `finish_reason: "tool_calls"`.
    ToolCalls {
        /// Text streamed before the calls (may be empty).
        text: String,
        /// The calls, in order.
        calls: Vec<ToolCall>,
    },
    /// An HTTP error (500, 429, ...) with an OpenAI-style error body, for the next
    /// `times` requests of this step; then the step's next turn answers. It does not
    /// count as a step (it produces no assistant message).
    Error {
        /// HTTP status.
        status: u16,
        /// `error.message` of the body.
        message: String,
        /// How many requests get the error (`usize::MAX`: all of them).
        times: usize,
    },
    /// Never answers (not even headers): for watchdog and timeout tests.
    Hang,
}

impl Turn {
    /// A text answer.
    pub fn text(text: impl Into<String>) -> Turn {
        Turn::Text(text.into())
    }

    /// One tool call and no text.
    pub fn tool(name: impl Into<String>, arguments: Value) -> Turn {
        Turn::ToolCalls {
            text: String::new(),
            calls: vec![ToolCall::new(name, arguments)],
        }
    }

    /// Several tool calls in one answer.
    pub fn tools(calls: Vec<ToolCall>) -> Turn {
        Turn::ToolCalls {
            text: String::new(),
            calls,
        }
    }

    /// An error answered every time its step is reached.
    pub fn error(status: u16, message: impl Into<String>) -> Turn {
        Turn::Error {
            status,
            message: message.into(),
            times: usize::MAX,
        }
    }

    /// An error answered to the next `times` requests of its step only.
    pub fn error_times(status: u16, message: impl Into<String>, times: usize) -> Turn {
        Turn::Error {
            status,
            message: message.into(),
            times,
        }
    }
}

/// What the model answers: the turns of each user prompt, and the session title.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    /// The turns, in order (see the module docs for how a request picks one).
    pub turns: Vec<Turn>,
    /// The answer to title-generation requests (requests without `tools`).
    pub title: String,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            turns: Vec::new(),
            title: "Scripted session".into(),
        }
    }
}

impl Script {
    /// A script of `turns` with the default title.
    pub fn new(turns: Vec<Turn>) -> Script {
        Script {
            turns,
            ..Script::default()
        }
    }

    /// Sets the title answer.
    pub fn with_title(mut self, title: impl Into<String>) -> Script {
        self.title = title.into();
        self
    }

    /// The turn for `step`, with the error turns that precede it (by script index).
    fn step(&self, step: usize) -> (Vec<usize>, Option<usize>) {
        let mut errors = Vec::new();
        let mut seen = 0;
        for (i, t) in self.turns.iter().enumerate() {
            if matches!(t, Turn::Error { .. }) {
                if seen == step {
                    errors.push(i);
                }
                continue;
            }
            if seen == step {
                return (errors, Some(i));
            }
            seen += 1;
        }
        (errors, None)
    }
}

/// What a request was, as the server classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Title generation (no `tools`).
    Title,
    /// Step `n` of the script.
    Step(usize),
    /// Not a chat completion the server understood (bad JSON, no `messages`).
    Invalid,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// When it arrived.
    pub at: Instant,
    /// Request path (`{base}/chat/completions`).
    pub path: String,
    /// How it was classified.
    pub kind: RequestKind,
    /// Whether it asked for a stream.
    pub stream: bool,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// The `Authorization` header it carried (the provider key OpenCode sent).
    pub authorization: Option<String>,
}

impl ModelRequest {
    /// The text of the last user message (string content or text parts joined).
    pub fn last_user_text(&self) -> Option<String> {
        let messages = self.body.get("messages")?.as_array()?;
        let m = messages.iter().rev().find(|m| m["role"] == "user")?;
        Some(content_text(&m["content"]))
    }

    /// Names of the tools offered to the model.
    pub fn tool_names(&self) -> Vec<String> {
        self.body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Contents of the `tool` messages (results of earlier calls), in order.
    pub fn tool_results(&self) -> Vec<String> {
        self.body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["role"] == "tool")
            .map(|m| content_text(&m["content"]))
            .collect()
    }
}

fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

struct Shared {
    /// The path prefix served under.
    base: String,
    script: Mutex<Script>,
    /// Requests served so far per error turn (by script index).
    errors_served: Mutex<HashMap<usize, usize>>,
    requests: Mutex<Vec<ModelRequest>>,
    count: watch::Sender<usize>,
    ids: std::sync::atomic::AtomicU64,
    /// Set when the server is dropped: the listener closes and hanging turns end.
    stopped: watch::Sender<bool>,
}

/// A running scripted model server; stops when dropped.
pub struct ModelServer {
    addr: SocketAddr,
    base: String,
    shared: Arc<Shared>,
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.shared.stopped.send_replace(true);
    }
}

impl ModelServer {
    /// Serves `script` on `addr` (port 0 picks one) under the path prefix `base`
    /// (`"/v1"`, or `""`), so OpenCode's `baseURL` is [`ModelServer::base_url`].
    pub async fn start(
        addr: SocketAddr,
        base: &str,
        script: Script,
    ) -> std::io::Result<ModelServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Self::serve_listener(listener, base, script)
    }

    /// Serves `script` on `addr` inside network namespace `ns` (e.g. a
    /// [`crate::PublicNet`]'s, where guests reach it through their egress rules):
    /// the socket is bound from a thread that joins the namespace, then served
    /// here like any other.
    pub async fn start_in_netns(
        ns: &str,
        addr: SocketAddr,
        base: &str,
        script: Script,
    ) -> std::io::Result<ModelServer> {
        let std_listener = bind_in_netns(ns, addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        Self::serve_listener(listener, base, script)
    }

    /// Serves `script` on an already bound listener (bound anywhere: another
    /// network namespace, a fixed port) under the path prefix `base`.
    pub fn serve_listener(
        listener: tokio::net::TcpListener,
        base: &str,
        script: Script,
    ) -> std::io::Result<ModelServer> {
        let addr = listener.local_addr()?;
        let base = base.trim_end_matches('/').to_owned();
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            base: base.clone(),
            script: Mutex::new(script),
            errors_served: Mutex::default(),
            requests: Mutex::default(),
            count,
            ids: std::sync::atomic::AtomicU64::new(1),
            stopped: watch::channel(false).0,
        });
        let app = Router::new()
            .route(&format!("{base}/chat/completions"), post(chat))
            .route(&format!("{base}/models"), get(models))
            .with_state(shared.clone());
        let mut stopped = shared.stopped.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                r = axum::serve(listener, app) => if let Err(e) = r {
                    tracing::warn!(error = %e, "scripted model server stopped");
                },
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
        Ok(ModelServer { addr, base, shared })
    }

    /// The address served on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{base}`: the `baseURL` to give the client.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }

    /// Replaces the script (for the next user prompt, say); error counts restart.
    pub fn set_script(&self, script: Script) {
        *lock(&self.shared.script) = script;
        lock(&self.shared.errors_served).clear();
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<ModelRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Waits until at least `n` requests were received; `None` after `timeout`.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Option<Vec<ModelRequest>> {
        let mut rx = self.shared.count.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .ok()?
            .ok()?;
        Some(self.requests())
    }

    /// A receiver of the number of requests received, updated as each arrives (before
    /// it is answered): `changed().await` is the notification.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.shared.count.subscribe()
    }
}

/// Binds a TCP listener on `addr` inside network namespace `ns`
/// (`/var/run/netns/<ns>`), from a short-lived thread that joins it; the socket
/// stays in that namespace after the thread ends.
fn bind_in_netns(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a valid, open namespace fd only changes this
            // thread's network namespace; the thread ends right after binding.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpListener::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the bind thread panicked")))
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn models() -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "atelier-testkit"}],
    }))
}

/// The step of a request: assistant messages with tool calls after the last user one.
fn step_of(messages: &[Value]) -> usize {
    let last_user = messages.iter().rposition(|m| m["role"] == "user");
    messages
        .iter()
        .skip(last_user.map_or(0, |i| i + 1))
        .filter(|m| {
            m["role"] == "assistant" && m["tool_calls"].as_array().is_some_and(|c| !c.is_empty())
        })
        .count()
}

fn error_response(status: u16, message: &str, kind: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": status}})),
    )
        .into_response()
}

/// What to send back, decided under the locks, played outside them.
enum Answer {
    Text(String),
    Calls(String, Vec<ToolCall>),
    Error(u16, String),
    Hang,
}

async fn chat(
    State(st): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let body = parsed.unwrap_or(Value::Null);
    let stream = body["stream"].as_bool().unwrap_or(false);
    let messages = body["messages"].as_array().cloned();
    let has_tools = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    let kind = match &messages {
        None => RequestKind::Invalid,
        Some(_) if !has_tools => RequestKind::Title,
        Some(m) => RequestKind::Step(step_of(m)),
    };
    let model = body["model"].as_str().unwrap_or(DEFAULT_MODEL).to_owned();
    let prompt_chars = serde_json::to_string(&body["messages"]).map_or(0, |s| s.len());
    lock(&st.requests).push(ModelRequest {
        at: Instant::now(),
        path: format!("{}/chat/completions", st.base),
        kind,
        stream,
        body,
        authorization,
    });
    st.count.send_modify(|c| *c += 1);

    let answer = {
        let script = lock(&st.script);
        match kind {
            RequestKind::Invalid => Answer::Error(400, "request has no `messages` array".into()),
            RequestKind::Title => Answer::Text(script.title.clone()),
            RequestKind::Step(n) => {
                let (errors, turn) = script.step(n);
                let mut served = lock(&st.errors_served);
                let pending = errors.into_iter().find_map(|i| match &script.turns[i] {
                    Turn::Error {
                        status,
                        message,
                        times,
                    } => {
                        let done = served.entry(i).or_insert(0);
                        (*done < *times).then(|| {
                            *done += 1;
                            (*status, message.clone())
                        })
                    }
                    _ => None,
                });
                match (pending, turn.map(|i| &script.turns[i])) {
                    (Some((status, message)), _) => Answer::Error(status, message),
                    (None, Some(Turn::Text(t))) => Answer::Text(t.clone()),
                    (None, Some(Turn::ToolCalls { text, calls })) => {
                        Answer::Calls(text.clone(), calls.clone())
                    }
                    (None, Some(Turn::Hang)) => Answer::Hang,
                    (None, Some(Turn::Error { .. })) | (None, None) => Answer::Error(
                        500,
                        format!(
                            "scripted model: no turn for step {n} (the script has {} turns)",
                            script.turns.len()
                        ),
                    ),
                }
            }
        }
    };
    let (text, calls) = match answer {
        Answer::Error(status, message) => {
            let kind = if status == 429 {
                "rate_limit_error"
            } else {
                "server_error"
            };
            return error_response(status, &message, kind);
        }
        Answer::Hang => {
            let mut stopped = st.stopped.subscribe();
            let _ = stopped.wait_for(|s| *s).await;
            return error_response(503, "scripted model server stopped", "server_error");
        }
        Answer::Text(t) => (t, Vec::new()),
        Answer::Calls(t, c) => (t, c),
    };
    let id = format!(
        "chatcmpl-{}",
        st.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let completion_chars = text.len()
        + calls
            .iter()
            .map(|c| c.name.len() + c.arguments.to_string().len())
            .sum::<usize>();
    let usage = usage(prompt_chars, completion_chars);
    let finish = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    let call_ids: Vec<String> = (0..calls.len()).map(|i| format!("call_{id}_{i}")).collect();
    if !stream {
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            message["tool_calls"] = calls
                .iter()
                .zip(&call_ids)
                .map(|(c, cid)| {
                    json!({"id": cid, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments.to_string()}})
                })
                .collect();
        }
        return axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Option<&str>, usage: Option<&Value>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            c["usage"] = u.clone();
        }
        c.to_string()
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        None,
        None,
    )];
    for piece in split_text(&text) {
        events.push(chunk(json!({"content": piece}), None, None));
    }
    for (i, (c, cid)) in calls.iter().zip(&call_ids).enumerate() {
        // Name first with empty arguments, then the arguments in two pieces, as
        // hosted models stream them.
        events.push(chunk(
            json!({"tool_calls": [{"index": i, "id": cid, "type": "function",
                   "function": {"name": c.name, "arguments": ""}}]}),
            None,
            None,
        ));
        let args = c.arguments.to_string();
        let mid = args.len() / 2;
        let mid = (mid..=args.len())
            .find(|m| args.is_char_boundary(*m))
            .unwrap_or(args.len());
        for part in [&args[..mid], &args[mid..]] {
            events.push(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                None,
                None,
            ));
        }
    }
    events.push(chunk(json!({}), Some(finish), Some(&usage)));
    events.push("[DONE]".to_owned());
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|data| Ok::<_, Infallible>(Event::default().data(data))),
    );
    Sse::new(stream).into_response()
}

/// Token counts estimated at 4 characters a token.
fn usage(prompt_chars: usize, completion_chars: usize) -> Value {
    let prompt = prompt_chars.div_ceil(4);
    let completion = completion_chars.div_ceil(4).max(1);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Text in word-sized deltas (each keeps its trailing space), as a model streams it.
fn split_text(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, ch) in text.char_indices() {
        if ch == ' ' {
            out.push(&text[start..=i]);
            start = i + 1;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_counts_tool_call_messages_after_the_last_user_message() {
        let msgs = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "first"}),
            json!({"role": "assistant", "tool_calls": [{"id": "a"}]}),
            json!({"role": "tool", "content": "r"}),
            json!({"role": "assistant", "content": "done"}),
            json!({"role": "user", "content": "second"}),
            json!({"role": "assistant", "tool_calls": [{"id": "b"}]}),
            json!({"role": "tool", "content": "r"}),
        ];
        assert_eq!(step_of(&msgs), 1);
        assert_eq!(step_of(&msgs[..6]), 0);
    }

    #[test]
    fn error_turns_attach_to_the_following_step() {
        let s = Script::new(vec![
            Turn::tool("bash", json!({})),
            Turn::error_times(500, "x", 1),
            Turn::text("done"),
        ]);
        assert_eq!(s.step(0), (vec![], Some(0)));
        assert_eq!(s.step(1), (vec![1], Some(2)));
        assert_eq!(s.step(2), (vec![], None));
    }

    #[test]
    fn text_splits_into_words_and_back() {
        let t = "hello streaming wörld ";
        assert_eq!(split_text(t).concat(), t);
        assert_eq!(split_text(t).len(), 3);
    }
}
