//! The client: one HTTP/1.1 exchange per call over a fresh byte stream from a
//! [`Connector`], each under a deadline.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt as _, Stream};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::event::{self, Decoded, Event};
use crate::sse::SseParser;
use crate::types::{
    Health, Message, PermissionRequest, PermissionRule, Prompt, QuestionRequest, Reply,
    SessionInfo, SessionStatus, Todo, message_of,
};

/// Default deadline of one call (connect, request and the whole answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle deadline of the event stream: three missed heartbeats (OpenCode 1.18
/// sends `server.heartbeat` about every 10 s).
pub const DEFAULT_EVENT_IDLE: Duration = Duration::from_secs(30);
/// Largest answer body read (a long session's messages can be large).
pub const MAX_BODY: usize = 64 << 20;
/// Largest SSE line or event accepted on the event stream; larger is [`Error::Stream`].
pub const MAX_EVENT: usize = 1 << 20;
/// How much of an error answer's body [`Error::Status`] keeps.
pub const MAX_ERROR_BODY: usize = 2048;
/// The basic-auth user of `opencode serve` (`OPENCODE_SERVER_PASSWORD` is the password).
pub const USER: &str = "opencode";
/// The request header naming the project directory an OpenCode call acts in (read
/// percent-decoded; the `directory` query parameter is the alternative).
pub const DIRECTORY_HEADER: &str = "x-opencode-directory";

/// Any byte stream to OpenCode's HTTP port (a guest stream through the agent, or TCP in
/// tests).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens a fresh connection per request (or per event stream).
pub trait Connector: Send + Sync + 'static {
    /// Opens one byte stream to OpenCode's port.
    fn connect(&self) -> BoxFuture<'static, io::Result<Box<dyn Io>>>;
}

/// A [`Connector`] dialling a TCP address.
#[derive(Debug, Clone, Copy)]
pub struct TcpConnector(pub SocketAddr);

impl Connector for TcpConnector {
    fn connect(&self) -> BoxFuture<'static, io::Result<Box<dyn Io>>> {
        let addr = self.0;
        async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as Box<dyn Io>)
        }
        .boxed()
    }
}

/// A typed client of one OpenCode server, acting in one project directory. Cheap to
/// clone (an `Arc` inside).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    connector: Arc<dyn Connector>,
    auth: HeaderValue,
    /// `None` for an empty directory: OpenCode then uses its own working directory.
    directory: Option<HeaderValue>,
    timeout: Duration,
    event_idle: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("directory", &self.inner.directory)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Aborts the task driving a connection when the call (or event stream) is done with it.
struct ConnGuard(JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    /// A client reaching OpenCode through `connector`, authenticating as user `opencode`
    /// with `password`, acting in project `directory` (sent percent-encoded in the
    /// `x-opencode-directory` header of every request; empty: OpenCode's own working
    /// directory).
    pub fn new(connector: Arc<dyn Connector>, password: &str, directory: &str) -> Client {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        // Base64 is always a valid header value; the fallback is unreachable.
        let mut auth = HeaderValue::from_str(&format!("Basic {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        auth.set_sensitive(true);
        // Percent-encoding leaves only ASCII that is valid in a header value.
        let directory = (!directory.is_empty())
            .then(|| HeaderValue::from_str(&encode_component(directory)).ok())
            .flatten();
        Client {
            inner: Arc::new(Inner {
                connector,
                auth,
                directory,
                timeout: DEFAULT_TIMEOUT,
                event_idle: DEFAULT_EVENT_IDLE,
            }),
        }
    }

    /// A client over TCP to `addr` (tests, or OpenCode on the host).
    pub fn tcp(addr: SocketAddr, password: &str, directory: &str) -> Client {
        Client::new(Arc::new(TcpConnector(addr)), password, directory)
    }

    /// Sets the deadline of each call (default [`DEFAULT_TIMEOUT`]); opening the event
    /// stream is a call, reading it is governed by [`Client::with_event_idle`].
    pub fn with_timeout(mut self, d: Duration) -> Client {
        Arc::make_mut(&mut self.inner).timeout = d;
        self
    }

    /// Sets how long the event stream may stay silent (no event, no heartbeat) before it
    /// ends with [`Error::Timeout`] (default [`DEFAULT_EVENT_IDLE`]).
    pub fn with_event_idle(mut self, d: Duration) -> Client {
        Arc::make_mut(&mut self.inner).event_idle = d;
        self
    }

    /// `GET /global/health`: OpenCode answers and says its version.
    pub async fn health(&self) -> Result<Health, Error> {
        self.json("health", Method::GET, "/global/health", None, None)
            .await
    }

    /// `POST /session`: a new session titled `title` with its own permission ruleset
    /// (evaluated before OpenCode's configured `permission`; empty: the config alone).
    pub async fn create_session(
        &self,
        title: &str,
        rules: &[PermissionRule],
    ) -> Result<SessionInfo, Error> {
        let mut body = json!({ "title": title });
        if !rules.is_empty() {
            body["permission"] = serde_json::to_value(rules).map_err(decode_err)?;
        }
        self.json("create session", Method::POST, "/session", Some(body), None)
            .await
    }

    /// `POST /session/{id}/prompt_async`: starts a turn and returns at once (204); follow
    /// it on [`Client::events`] or [`Client::statuses`].
    pub async fn prompt_async(&self, session: &str, prompt: &Prompt) -> Result<(), Error> {
        let mut body = json!({ "parts": [{ "type": "text", "text": prompt.text }] });
        if let Some(m) = &prompt.model {
            body["model"] = serde_json::to_value(m).map_err(decode_err)?;
        }
        if let Some(a) = &prompt.agent {
            body["agent"] = json!(a);
        }
        if let Some(v) = &prompt.variant {
            body["variant"] = json!(v);
        }
        let path = format!("/session/{}/prompt_async", encode_component(session));
        self.call(
            "prompt session",
            Method::POST,
            &path,
            Some(body),
            Some(format!("session {session}")),
        )
        .await
        .map(drop)
    }

    /// `POST /session/{id}/abort`: stops the session's running turn (pending permission
    /// requests stay listed until answered).
    pub async fn abort(&self, session: &str) -> Result<(), Error> {
        let path = format!("/session/{}/abort", encode_component(session));
        self.json::<Value>(
            "abort session",
            Method::POST,
            &path,
            None,
            Some(format!("session {session}")),
        )
        .await
        .map(drop)
    }

    /// `GET /session/status`: the status of sessions that are not idle (an idle session
    /// is usually absent from the map).
    pub async fn statuses(&self) -> Result<HashMap<String, SessionStatus>, Error> {
        self.json(
            "session statuses",
            Method::GET,
            "/session/status",
            None,
            None,
        )
        .await
    }

    /// `GET /permission`: pending permission requests of every session.
    pub async fn permissions(&self) -> Result<Vec<PermissionRequest>, Error> {
        self.json("list permissions", Method::GET, "/permission", None, None)
            .await
    }

    /// `POST /permission/{id}/reply`: answers a permission request; `message` (with
    /// [`Reply::Reject`]) is handed to the agent as guidance so it continues.
    pub async fn reply_permission(
        &self,
        id: &str,
        reply: Reply,
        message: Option<&str>,
    ) -> Result<(), Error> {
        let mut body = json!({ "reply": reply });
        if let Some(m) = message {
            body["message"] = json!(m);
        }
        let path = format!("/permission/{}/reply", encode_component(id));
        self.json::<Value>(
            "reply to permission",
            Method::POST,
            &path,
            Some(body),
            Some(format!("permission request {id}")),
        )
        .await
        .map(drop)
    }

    /// `GET /question`: pending questions of every session.
    pub async fn questions(&self) -> Result<Vec<QuestionRequest>, Error> {
        self.json("list questions", Method::GET, "/question", None, None)
            .await
    }

    /// `POST /question/{id}/reply`: one answer per question, each the chosen labels (or
    /// free text where the question allows it).
    pub async fn reply_question(&self, id: &str, answers: Vec<Vec<String>>) -> Result<(), Error> {
        let path = format!("/question/{}/reply", encode_component(id));
        self.json::<Value>(
            "reply to question",
            Method::POST,
            &path,
            Some(json!({ "answers": answers })),
            Some(format!("question {id}")),
        )
        .await
        .map(drop)
    }

    /// `POST /question/{id}/reject`: dismisses a question (the tool call fails).
    pub async fn reject_question(&self, id: &str) -> Result<(), Error> {
        let path = format!("/question/{}/reject", encode_component(id));
        self.json::<Value>(
            "reject question",
            Method::POST,
            &path,
            None,
            Some(format!("question {id}")),
        )
        .await
        .map(drop)
    }

    /// `GET /session/{id}/todo`: the session's todo list.
    pub async fn todos(&self, session: &str) -> Result<Vec<Todo>, Error> {
        let path = format!("/session/{}/todo", encode_component(session));
        self.json(
            "session todos",
            Method::GET,
            &path,
            None,
            Some(format!("session {session}")),
        )
        .await
    }

    /// `GET /session/{id}/message`: the session's messages with their parts, oldest
    /// first; assistant messages carry cost and tokens.
    pub async fn messages(&self, session: &str) -> Result<Vec<Message>, Error> {
        self.messages_limited(session, None).await
    }

    /// `GET /session/{id}/message?limit=N`: the newest `limit` messages, oldest
    /// first (all of them without a limit).
    pub async fn messages_limited(
        &self,
        session: &str,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, Error> {
        let mut path = format!("/session/{}/message", encode_component(session));
        if let Some(n) = limit {
            path.push_str(&format!("?limit={n}"));
        }
        let items: Vec<Value> = self
            .json(
                "session messages",
                Method::GET,
                &path,
                None,
                Some(format!("session {session}")),
            )
            .await?;
        items
            .iter()
            .map(|m| message_of(m).map_err(Error::Decode))
            .collect()
    }

    /// `PUT /auth/{provider}`: stores an API key for `provider` in OpenCode's auth store.
    pub async fn set_auth(&self, provider: &str, key: &str) -> Result<(), Error> {
        let path = format!("/auth/{}", encode_component(provider));
        self.json::<Value>(
            "set provider key",
            Method::PUT,
            &path,
            Some(json!({ "type": "api", "key": key })),
            None,
        )
        .await
        .map(drop)
    }

    /// `GET /event`: OpenCode's event stream for the directory. The first item is
    /// [`Event::Connected`]. An event that does not decode is an `Err(Error::Decode)`
    /// item and the stream goes on; a broken, closed, oversized or silent stream ends
    /// with one `Err` (Stream or Timeout) item. Events are not replayed: after a new
    /// stream, re-read state (permissions, questions, statuses).
    pub async fn events(&self) -> Result<EventStream, Error> {
        let what = "open event stream";
        let (resp, guard) = tokio::time::timeout(
            self.inner.timeout,
            self.send(what, Method::GET, "/event", None, "text/event-stream"),
        )
        .await
        .map_err(|_| Error::Timeout(what))??;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = tokio::time::timeout(self.inner.timeout, read_body(resp))
                .await
                .map_err(|_| Error::Timeout(what))??;
            return Err(status_error(status, &body, "event stream".into()));
        }
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !ct.starts_with("text/event-stream") {
            return Err(Error::Decode(format!(
                "event stream answered with content type `{ct}`, not text/event-stream"
            )));
        }
        Ok(EventStream::new(
            resp.into_body(),
            guard,
            self.inner.event_idle,
        ))
    }

    /// One call returning JSON of type `T`.
    async fn json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
        subject: Option<String>,
    ) -> Result<T, Error> {
        let bytes = self.call(what, method, path, body, subject).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Decode(format!(
                "{what}: {e} in {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_BODY)])
            ))
        })
    }

    /// One call under the deadline; a non-2xx answer is an error (`subject` names what a
    /// 404 did not find).
    async fn call(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
        subject: Option<String>,
    ) -> Result<Bytes, Error> {
        let body = match body {
            Some(v) => Some(serde_json::to_vec(&v).map_err(decode_err)?),
            None => None,
        };
        let (status, bytes) = tokio::time::timeout(self.inner.timeout, async {
            let (resp, _guard) = self
                .send(what, method, path, body, "application/json")
                .await?;
            let status = resp.status().as_u16();
            Ok::<_, Error>((status, read_body(resp).await?))
        })
        .await
        .map_err(|_| Error::Timeout(what))??;
        if (200..300).contains(&status) {
            tracing::trace!(what, path, status, "opencode call");
            return Ok(bytes);
        }
        Err(status_error(
            status,
            &bytes,
            subject.unwrap_or_else(|| path.to_owned()),
        ))
    }

    /// Connects, handshakes and sends one request; the guard keeps the connection alive.
    async fn send(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &'static str,
    ) -> Result<(Response<Incoming>, ConnGuard), Error> {
        let io = self
            .inner
            .connector
            .connect()
            .await
            .map_err(Error::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Error::Stream(format!("{what}: http handshake: {e}")))?;
        let guard = ConnGuard(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "opencode connection ended with an error");
            }
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header(AUTHORIZATION, self.inner.auth.clone())
            .header(ACCEPT, accept);
        if let Some(d) = &self.inner.directory {
            req = req.header(DIRECTORY_HEADER, d.clone());
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Decode(format!("{what}: cannot build request for {path}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Stream(format!("{what}: {e}")))?;
        Ok((resp, guard))
    }
}

fn decode_err(e: serde_json::Error) -> Error {
    Error::Decode(e.to_string())
}

async fn read_body(resp: Response<Incoming>) -> Result<Bytes, Error> {
    Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| Error::Stream(format!("reading an answer (at most {MAX_BODY} bytes): {e}")))
}

/// The error for a non-2xx answer: 404 is [`Error::NotFound`] with OpenCode's message.
fn status_error(status: u16, body: &[u8], subject: String) -> Error {
    let text = body_message(body);
    if status == 404 {
        return Error::NotFound(if text.is_empty() {
            subject
        } else {
            format!("{subject} ({text})")
        });
    }
    Error::Status { status, body: text }
}

/// OpenCode's error message from an error body (`{data:{message}}` or `{message}`), else
/// the body's start.
fn body_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(m) = v["data"]["message"].as_str().or(v["message"].as_str())
    {
        return truncate(m);
    }
    truncate(&String::from_utf8_lossy(body))
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_BODY);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Percent-encodes like JavaScript's `encodeURIComponent` (what OpenCode decodes).
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// OpenCode's event stream: `Stream<Item = Result<Event, Error>>`. Dropping it closes
/// the connection.
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<Event, Error>> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

struct StreamState {
    body: Incoming,
    parser: SseParser,
    queue: VecDeque<Result<Event, Error>>,
    idle: Duration,
    done: bool,
    _guard: ConnGuard,
}

impl EventStream {
    fn new(body: Incoming, guard: ConnGuard, idle: Duration) -> EventStream {
        let st = StreamState {
            body,
            parser: SseParser::new(MAX_EVENT),
            queue: VecDeque::new(),
            idle,
            done: false,
            _guard: guard,
        };
        EventStream {
            inner: Box::pin(futures::stream::unfold(st, next_item)),
        }
    }
}

async fn next_item(mut st: StreamState) -> Option<(Result<Event, Error>, StreamState)> {
    loop {
        if let Some(item) = st.queue.pop_front() {
            return Some((item, st));
        }
        if st.done {
            return None;
        }
        let end = match tokio::time::timeout(st.idle, st.body.frame()).await {
            Err(_) => {
                Error::Timeout("event stream (no event or heartbeat within the idle deadline)")
            }
            Ok(None) => Error::Stream("opencode closed the event stream".into()),
            Ok(Some(Err(e))) => Error::Stream(format!("reading the event stream: {e}")),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                match st.parser.push(&data) {
                    Ok(events) => {
                        for ev in events {
                            match event::decode(&ev.data) {
                                Ok(Decoded::Heartbeat) => {}
                                Ok(Decoded::Event(e)) => st.queue.push_back(Ok(e)),
                                Err(m) => st.queue.push_back(Err(Error::Decode(m))),
                            }
                        }
                        continue;
                    }
                    Err(e) => Error::Stream(e.to_string()),
                }
            }
        };
        st.done = true;
        st.queue.push_back(Err(end));
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>(_: &T) {}

    #[test]
    fn the_client_its_calls_and_the_event_stream_can_move_across_tasks() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Client>();
        let c = Client::tcp(([127, 0, 0, 1], 9).into(), "pw", "/w");
        let prompt = Prompt::text("x");
        send(&c.health());
        send(&c.create_session("t", &[]));
        send(&c.prompt_async("s", &prompt));
        send(&c.messages("s"));
        send(&c.reply_question("q", vec![]));
        send(&c.events());
        fn stream<T: Stream + Send + Unpin>() {}
        stream::<EventStream>();
    }

    #[test]
    fn components_encode_like_javascript() {
        assert_eq!(encode_component("/work/a b/ü"), "%2Fwork%2Fa%20b%2F%C3%BC");
        assert_eq!(
            encode_component("ses_AZaz09-_.!~*'()"),
            "ses_AZaz09-_.!~*'()"
        );
    }

    #[test]
    fn error_bodies_give_opencode_messages() {
        let e = status_error(
            404,
            br#"{"_tag":"PermissionNotFoundError","requestID":"per_x","message":"gone"}"#,
            "permission request per_x".into(),
        );
        assert!(matches!(&e, Error::NotFound(m) if m == "permission request per_x (gone)"));
        let e = status_error(500, &[b'x'; 5000], "s".into());
        assert!(matches!(&e, Error::Status { status: 500, body } if body.len() == MAX_ERROR_BODY));
    }
}
