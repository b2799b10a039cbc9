//! Host-side async client of the agent.
//!
//! One reader task decodes frames and routes them to the outstanding request by id;
//! one writer task sends frames (control frames such as credits and kills first). The
//! reader never blocks on a consumer: stream data is bounded by the credit window
//! ([`crate::STREAM_WINDOW`]) and a guest that overruns it has that stream failed.
//!
//! Deadlines: every request that awaits a reply fails with [`ProtoError::Timeout`]
//! when the agent does not answer within the client's timeout
//! ([`DEFAULT_TIMEOUT`], see [`AgentClient::set_timeout`]). Streams (exec, pty,
//! file reads) get that deadline for their start (the first event); once started
//! they live as long as the command does.
//!
//! Limits on what the agent can send (the guest is untrusted; see
//! `docs/security.md`): every queue the agent can fill is bounded. A request's reply
//! queue holds at most [`REPLY_QUEUE`] messages (stream data is also bounded by the
//! credit window); the control queue to the agent at most [`CONTROL_QUEUE`] frames.
//! A protocol violation closes the connection ([`ProtoError::Disconnected`] with a
//! reason starting `protocol violation`): a repeated once-only event (`Started`,
//! `StreamOpened`, `StreamEof`), a stream event for a request that is no stream,
//! credit beyond the window, an agent that does not read its control channel, or a
//! flood of rejected frames, skipped garbage or Hellos (see [`crate::limits`]). Overrunning
//! one stream's window or queue fails only that stream. Guest-supplied text is logged
//! truncated and rate-limited per connection.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{PollSemaphore, PollSender};

use crate::dev::{DevSpec, DevStatus};
use crate::error::ProtoError;
use crate::frame::{FrameDecoder, SYNC_PREAMBLE_LEN, encode_frame};
use crate::limits::{
    DECODE_ERROR_BUDGET, GARBAGE_BUDGET, HELLO_BUDGET, LOG_TEXT_MAX, Limits, truncate_text,
};
use crate::message::{
    ErrorKind, ExecEvent, ExecRequest, GuestMessage, Hello, HostMessage, Metrics, PtyEvent,
    PtyRequest,
};
use crate::net::NetConfig;
use crate::{
    CAP_TCP_STREAM, EXEC_CHUNK_LEN, FILE_CHUNK_LEN, MIN_AGENT_PROTOCOL_VERSION, NO_REQUEST,
    PROTOCOL_VERSION, STREAM_CHUNK_LEN, STREAM_WINDOW,
};

type Reply = Result<GuestMessage, ProtoError>;

/// Frames queued for the writer; bounded so bulk uploads wait for the socket.
const DATA_QUEUE: usize = 32;

/// Messages queued for one request and not yet taken by its consumer. Stream data is
/// also bounded by the credit window; this bounds a flood of tiny frames.
pub const REPLY_QUEUE: usize = 4096;

/// Control frames (credits, cancels, kills) queued for the agent. Only an agent that
/// stops reading its port while sending fills it: a protocol violation.
pub const CONTROL_QUEUE: usize = 4096;

/// Default deadline of a request to the agent (see [`AgentClient::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Extra time `dev_start` and `dev_stop` get on top of the timeout: the agent waits
/// up to its stop grace period (3 s) for a dev command to end.
const DEV_STOP_ALLOWANCE: Duration = Duration::from_secs(5);

/// Handle to one agent connection. Cheap to clone; the connection's tasks stop when
/// the last clone (including exec handles and read streams) is dropped.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    _tasks: Arc<TaskGuard>,
}

struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[derive(Clone, Default)]
struct Status {
    hello: Option<Hello>,
    /// Capabilities of the agent that sent `hello`; `None` while a version-2+ agent's
    /// `Capabilities` message has not arrived yet.
    caps: Option<Vec<String>>,
    closed: Option<String>,
}

/// `Pending::seen` bits: stream events allowed once per stream.
const SEEN_OPENED: u8 = 1;
const SEEN_EOF: u8 = 2;
const SEEN_STARTED: u8 = 4;

struct Pending {
    op: &'static str,
    tx: mpsc::Sender<Reply>,
    /// Stream bytes received and not yet consumed (guest->host flow control).
    inbound: Option<Arc<AtomicU64>>,
    /// Highest value `inbound` reached.
    peak: Arc<AtomicU64>,
    /// Once-only stream events seen (`SEEN_*`).
    seen: u8,
    /// Credits for host->guest stream data (stdin, upload chunks).
    credit: Option<Arc<Semaphore>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    closed: Option<String>,
}

struct Inner {
    data_tx: mpsc::Sender<Vec<u8>>,
    ctl_tx: mpsc::Sender<Vec<u8>>,
    state: Mutex<State>,
    /// Names the connection in logs (the socket path, which holds the sandbox id).
    label: String,
    /// Floods the connection tolerates before it is closed, and the log limiter.
    limits: Mutex<Limits>,
    status: watch::Sender<Status>,
    /// The dev commands' statuses as the agent last pushed them.
    dev: watch::Sender<Option<Vec<crate::DevStatus>>>,
    restarts: AtomicU64,
    decode_errors: AtomicU64,
    next_id: AtomicU64,
    /// Deadline of a request, in milliseconds.
    timeout_ms: AtomicU64,
}

struct Registration {
    id: u64,
    rx: mpsc::Receiver<Reply>,
    inbound: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    credit: Arc<Semaphore>,
    guard: PendingGuard,
}

/// Removes a pending request when its owner goes away; optionally cancels it in the guest.
struct PendingGuard {
    inner: Arc<Inner>,
    id: u64,
    cancel_on_drop: bool,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let removed = self.inner.lock().pending.remove(&self.id);
        // Writers waiting for credit (exec stdin) stop instead of waiting forever.
        if let Some(c) = removed.as_ref().and_then(|p| p.credit.as_ref()) {
            c.close();
        }
        if removed.is_some() && self.cancel_on_drop {
            let _ = self.inner.send_ctl(&HostMessage::Cancel { id: self.id });
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain maps.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disconnected(&self) -> ProtoError {
        let reason = self
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "client shut down".into());
        ProtoError::Disconnected { reason }
    }

    fn send_ctl(&self, msg: &HostMessage) -> Result<(), ProtoError> {
        let frame = encode_frame(msg)?;
        match self.ctl_tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.violation(format!(
                    "the agent does not read its control channel ({CONTROL_QUEUE} frames queued)"
                ));
                Err(self.disconnected())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.disconnected()),
        }
    }

    /// Closes the connection for a protocol violation by the agent.
    fn violation(&self, what: String) {
        self.close(format!("protocol violation: {what}"));
    }

    /// Logs a warning about something the agent sent, rate-limited per connection,
    /// with guest-supplied text cut to [`LOG_TEXT_MAX`] characters.
    fn guest_warn(&self, what: &str, detail: &str) {
        let suppressed = match self.limits().log.admit(Instant::now()) {
            Some(suppressed) => suppressed,
            None => return,
        };
        let detail = truncate_text(detail, LOG_TEXT_MAX);
        tracing::warn!(peer = %self.label, suppressed, detail = %detail, "{what}");
    }

    fn limits(&self) -> MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send_data(&self, msg: &HostMessage) -> Result<(), ProtoError> {
        let frame = encode_frame(msg)?;
        if self.lock().closed.is_some() {
            return Err(self.disconnected());
        }
        self.data_tx
            .send(frame)
            .await
            .map_err(|_| self.disconnected())
    }

    fn register(
        self: &Arc<Self>,
        op: &'static str,
        inbound: bool,
        credit: bool,
    ) -> Result<Registration, ProtoError> {
        // One slot more than REPLY_QUEUE: room for the error that fails an overrun stream.
        let (tx, rx) = mpsc::channel(REPLY_QUEUE + 1);
        let inbound_ctr = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let sem = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(ProtoError::Disconnected {
                reason: reason.clone(),
            });
        }
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id == NO_REQUEST {
            id = self.next_id.fetch_add(1, Ordering::Relaxed);
        }
        state.pending.insert(
            id,
            Pending {
                op,
                tx,
                inbound: inbound.then(|| inbound_ctr.clone()),
                peak: peak.clone(),
                seen: 0,
                credit: credit.then(|| sem.clone()),
            },
        );
        drop(state);
        Ok(Registration {
            id,
            rx,
            inbound: inbound_ctr,
            peak,
            credit: sem,
            guard: PendingGuard {
                inner: self.clone(),
                id,
                cancel_on_drop: false,
            },
        })
    }

    /// Fails every outstanding request with an error built from its operation name.
    fn fail_all(&self, make: impl Fn(&'static str) -> ProtoError) {
        let pending: Vec<Pending> = self.lock().pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            if let Some(c) = &p.credit {
                c.close();
            }
            let _ = p.tx.try_send(Err(make(p.op)));
        }
    }

    fn close(&self, reason: String) {
        {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            tracing::warn!(peer = %self.label, %reason, "agent connection closed");
            state.closed = Some(reason.clone());
        }
        self.fail_all(|_| ProtoError::Disconnected {
            reason: reason.clone(),
        });
        self.status.send_modify(|s| s.closed = Some(reason.clone()));
    }

    fn on_hello(&self, hello: Hello) {
        if !self.limits().hellos.take(1, Instant::now()) {
            self.violation(format!(
                "more than {} Hellos in a row (a flood)",
                HELLO_BUDGET.burst
            ));
            return;
        }
        let mut restarted = false;
        self.status.send_modify(|s| {
            let first = match &s.hello {
                Some(prev) => {
                    restarted = prev.pid != hello.pid || prev.boot_id != hello.boot_id;
                    restarted || prev.version != hello.version
                }
                None => true,
            };
            if first {
                // A version-1 agent serves no capabilities and announces none; a newer
                // one sends `Capabilities` right after this Hello.
                s.caps = (hello.version < 2).then(Vec::new);
            }
            s.hello = Some(hello.clone());
        });
        tracing::info!(
            peer = %self.label,
            pid = hello.pid,
            version = hello.version,
            restarted,
            "agent hello"
        );
        if restarted {
            self.restarts.fetch_add(1, Ordering::Relaxed);
            self.fail_all(|op| ProtoError::AgentRestarted { op, pid: hello.pid });
        }
    }

    /// Delivers a request's final message (the request is done with it).
    fn deliver(&self, id: u64, msg: GuestMessage) {
        let Some(entry) = self.lock().pending.remove(&id) else {
            tracing::debug!(id, "reply for unknown request dropped");
            return;
        };
        if let Some(c) = &entry.credit {
            c.close();
        }
        // The queue always has a slot left for the last message (see `queue`).
        let _ = entry.tx.try_send(Ok(msg));
    }

    /// Queues a non-final message for a request; false when its queue is full (only
    /// the slot reserved for the final message is left).
    fn queue(entry: &Pending, msg: GuestMessage) -> bool {
        if entry.tx.capacity() <= 1 && !entry.tx.is_closed() {
            return false;
        }
        let _ = entry.tx.try_send(Ok(msg));
        true
    }

    fn on_data(&self, id: u64, len: usize, msg: GuestMessage) {
        let mut state = self.lock();
        let Some(entry) = state.pending.get(&id) else {
            return;
        };
        let within = match &entry.inbound {
            Some(ctr) => {
                let now = ctr.fetch_add(len as u64, Ordering::AcqRel) + len as u64;
                entry.peak.fetch_max(now, Ordering::AcqRel);
                now <= u64::from(STREAM_WINDOW)
            }
            None => false,
        };
        if within && Self::queue(entry, msg) {
            return;
        }
        if let Some(entry) = state.pending.remove(&id) {
            drop(state);
            if let Some(c) = &entry.credit {
                c.close();
            }
            let _ = entry
                .tx
                .try_send(Err(ProtoError::FlowControl { op: entry.op, id }));
            let _ = self.send_ctl(&HostMessage::Cancel { id });
        }
    }

    /// Delivers a stream event that may come once per stream (`bit`); a repeat, or
    /// the event for a request that is no stream, is a protocol violation that closes
    /// the connection (so a guest cannot fill a queue with them).
    fn deliver_once(&self, id: u64, bit: u8, msg: GuestMessage) {
        let mut state = self.lock();
        let Some(entry) = state.pending.get_mut(&id) else {
            tracing::debug!(id, "stream event for unknown request dropped");
            return;
        };
        if entry.inbound.is_some() && entry.seen & bit == 0 {
            entry.seen |= bit;
            // A fresh stream's queue cannot be full of once-only events.
            let _ = entry.tx.try_send(Ok(msg));
            return;
        }
        let op = entry.op;
        drop(state);
        let what = truncate_text(&format!("{msg:?}"), LOG_TEXT_MAX);
        self.violation(format!("unexpected {what} for {op} request {id}"));
    }

    fn on_capabilities(&self, caps: Vec<String>) {
        tracing::debug!(?caps, "agent capabilities");
        self.status.send_modify(|s| s.caps = Some(caps));
    }

    /// Credit returned by the agent for data it consumed. The agent can only return
    /// what the host sent, so credit that would raise the available window above
    /// [`STREAM_WINDOW`] is a protocol violation (and would otherwise overflow the
    /// semaphore).
    fn on_credit(&self, id: u64, bytes: u32) {
        let excess = {
            let state = self.lock();
            let Some(c) = state.pending.get(&id).and_then(|p| p.credit.as_ref()) else {
                return;
            };
            let available = c.available_permits() as u64;
            if available + u64::from(bytes) > u64::from(STREAM_WINDOW) {
                Some(available)
            } else {
                c.add_permits(bytes as usize);
                None
            }
        };
        if let Some(available) = excess {
            self.violation(format!(
                "credit of {bytes} bytes for request {id} exceeds the window ({available} of {STREAM_WINDOW} already available)"
            ));
        }
    }

    fn dispatch(&self, msg: GuestMessage) {
        match msg {
            GuestMessage::Hello(hello) => self.on_hello(hello),
            GuestMessage::Credit { id, bytes } => self.on_credit(id, bytes),
            GuestMessage::Error {
                id: NO_REQUEST,
                kind,
                message,
            } => {
                self.guest_warn(
                    "agent reported an error outside any request",
                    &format!("{kind:?}: {message}"),
                );
            }
            GuestMessage::Exec { id, ref event } => match event {
                ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => {
                    let len = d.len();
                    self.on_data(id, len, msg)
                }
                ExecEvent::Started { .. } => self.deliver_once(id, SEEN_STARTED, msg),
                ExecEvent::Exit { .. } => self.deliver(id, msg),
            },
            GuestMessage::Pty { id, ref event } => match event {
                PtyEvent::Output(d) => {
                    let len = d.len();
                    self.on_data(id, len, msg)
                }
                PtyEvent::Started { .. } => self.deliver_once(id, SEEN_STARTED, msg),
                PtyEvent::Exit { .. } => self.deliver(id, msg),
            },
            GuestMessage::FileChunk { id, ref data }
            | GuestMessage::DevLog { id, ref data }
            | GuestMessage::StreamData { id, ref data } => {
                let len = data.len();
                self.on_data(id, len, msg)
            }
            GuestMessage::Capabilities { caps } => self.on_capabilities(caps),
            // Only the latest list is kept: a flood of them costs no memory.
            GuestMessage::DevChanged { items } => {
                self.dev.send_replace(Some(items));
            }
            GuestMessage::StreamOpened { id } => self.deliver_once(id, SEEN_OPENED, msg),
            GuestMessage::StreamEof { id } => self.deliver_once(id, SEEN_EOF, msg),
            GuestMessage::Pong { id }
            | GuestMessage::DevList { id, .. }
            | GuestMessage::FileEnd { id, .. }
            | GuestMessage::WriteDone { id, .. }
            | GuestMessage::Metrics { id, .. }
            | GuestMessage::Done { id }
            | GuestMessage::Error { id, .. } => self.deliver(id, msg),
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut reader: R) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut skipped = 0u64;
    // Ends with the connection (closed elsewhere, e.g. for a violation while sending),
    // so the socket is released.
    let mut status = inner.status.subscribe();
    loop {
        let read = tokio::select! {
            r = reader.read(&mut buf) => r,
            _ = status.wait_for(|s| s.closed.is_some()) => return,
        };
        let n = match read {
            Ok(0) => {
                inner.close("agent socket reached end of stream".into());
                return;
            }
            Ok(n) => n,
            Err(e) => {
                inner.close(format!("reading from agent socket: {e}"));
                return;
            }
        };
        decoder.push(&buf[..n]);
        while let Some(frame) = decoder.next_frame::<GuestMessage>() {
            match frame {
                Ok(msg) => inner.dispatch(msg),
                Err(e) => {
                    inner.decode_errors.fetch_add(1, Ordering::Relaxed);
                    inner.guest_warn("rejected a frame from the agent", &e.to_string());
                    if !inner.limits().decode_errors.take(1, Instant::now()) {
                        inner.violation(format!(
                            "more than {} rejected frames in a row (a flood of garbage)",
                            DECODE_ERROR_BUDGET.burst
                        ));
                    }
                }
            }
            if inner.lock().closed.is_some() {
                return;
            }
        }
        // Bytes skipped while looking for a frame: garbage, or a restart's preamble.
        let now_skipped = decoder.skipped_bytes();
        let delta = now_skipped - skipped;
        skipped = now_skipped;
        if delta > 0 && !inner.limits().garbage.take(delta, Instant::now()) {
            inner.violation(format!(
                "more than {} bytes of garbage in a row (no frame)",
                GARBAGE_BUDGET.burst
            ));
        }
        if inner.lock().closed.is_some() {
            return;
        }
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut writer: W,
    mut ctl_rx: mpsc::Receiver<Vec<u8>>,
    mut data_rx: mpsc::Receiver<Vec<u8>>,
) {
    // Ends with the connection, so a connection closed for a violation drops the socket.
    let mut status = inner.status.subscribe();
    loop {
        let frame = tokio::select! {
            biased;
            _ = status.wait_for(|s| s.closed.is_some()) => return,
            Some(f) = ctl_rx.recv() => f,
            Some(f) = data_rx.recv() => f,
            else => return,
        };
        // A write blocked on an agent that does not read ends with the connection too.
        let written = tokio::select! {
            r = writer.write_all(&frame) => r,
            _ = status.wait_for(|s| s.closed.is_some()) => return,
        };
        if let Err(e) = written {
            inner.close(format!("writing to agent socket: {e}"));
            return;
        }
    }
}

fn reply_error(op: &'static str, msg: GuestMessage) -> ProtoError {
    match msg {
        GuestMessage::Error { kind, message, .. } => ProtoError::Agent { op, kind, message },
        other => ProtoError::UnexpectedReply {
            op,
            got: format!("{other:?}"),
        },
    }
}

fn initial_id() -> u64 {
    // Distinct per connection so a reconnecting host never reuses ids of streams the
    // agent may still be serving for the previous connection.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos & 0xFFFF_FFFF_FFFF) << 12 | 1
}

impl AgentClient {
    /// Connects to the agent's unix socket and starts the connection's tasks; returns
    /// before the agent's Hello (see [`wait_ready`](Self::wait_ready)).
    pub async fn connect_unix(path: &Path) -> Result<AgentClient, ProtoError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ProtoError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self::from_stream_labeled(
            stream,
            &path.display().to_string(),
        ))
    }

    /// Runs the protocol over any byte stream (vsock, tests). Must be called inside a
    /// tokio runtime.
    pub fn from_stream<S>(stream: S) -> AgentClient
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::from_stream_labeled(stream, "stream")
    }

    /// [`from_stream`](Self::from_stream) with `label` naming the connection in logs.
    pub fn from_stream_labeled<S>(stream: S, label: &str) -> AgentClient
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let inner = Arc::new(Inner {
            data_tx,
            ctl_tx,
            state: Mutex::new(State::default()),
            label: label.to_owned(),
            limits: Mutex::new(Limits::new(Instant::now())),
            status: watch::Sender::new(Status::default()),
            dev: watch::Sender::new(None),
            restarts: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            next_id: AtomicU64::new(initial_id()),
            timeout_ms: AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64),
        });
        // Flush any torn frame a previous host left in the agent's decoder, then say hello.
        let _ = inner.ctl_tx.try_send(vec![0; SYNC_PREAMBLE_LEN]);
        let _ = inner.send_ctl(&HostMessage::Hello {
            version: PROTOCOL_VERSION,
        });
        let tasks = vec![
            tokio::spawn(reader_task(inner.clone(), reader)),
            tokio::spawn(writer_task(inner.clone(), writer, ctl_rx, data_rx)),
        ];
        AgentClient {
            inner,
            _tasks: Arc::new(TaskGuard(tasks)),
        }
    }

    /// Waits for a Hello with a compatible version (returns at once if one was seen).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Hello, ProtoError> {
        let mut rx = self.inner.status.subscribe();
        let wait = async {
            loop {
                {
                    let status = rx.borrow_and_update();
                    if let Some(reason) = &status.closed {
                        return Err(ProtoError::Disconnected {
                            reason: reason.clone(),
                        });
                    }
                    if let Some(hello) = &status.hello {
                        if hello.version < MIN_AGENT_PROTOCOL_VERSION {
                            return Err(ProtoError::AgentTooOld {
                                agent: hello.version,
                                min: MIN_AGENT_PROTOCOL_VERSION,
                            });
                        }
                        if hello.version > PROTOCOL_VERSION {
                            return Err(ProtoError::IncompatibleVersion {
                                agent: hello.version,
                                host: PROTOCOL_VERSION,
                            });
                        }
                        if status.caps.is_some() {
                            return Ok(hello.clone());
                        }
                        // A version-2+ agent: its Capabilities follow the Hello.
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(self.inner.disconnected());
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ProtoError::Timeout {
                op: "wait_ready",
                after: timeout,
            })?
    }

    /// The last Hello seen, if any.
    pub fn hello(&self) -> Option<Hello> {
        self.inner.status.borrow().hello.clone()
    }

    /// The capabilities the agent announced (empty for a version-1 agent); `None`
    /// before [`wait_ready`](Self::wait_ready) succeeded.
    pub fn capabilities(&self) -> Option<Vec<String>> {
        self.inner.status.borrow().caps.clone()
    }

    /// Whether the connected agent serves capability `cap` (false before it is known).
    pub fn supports(&self, cap: &str) -> bool {
        self.inner
            .status
            .borrow()
            .caps
            .as_ref()
            .is_some_and(|caps| caps.iter().any(|c| c == cap))
    }

    /// Number of agent restarts seen (Hellos from a new agent process after the first).
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Frames from the agent rejected as oversize or malformed.
    pub fn decode_errors(&self) -> u64 {
        self.inner.decode_errors.load(Ordering::Relaxed)
    }

    /// False once the socket closed; every request then fails with `Disconnected`.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().closed.is_none()
    }

    /// Whether `other` is a clone of this client (the same connection).
    pub fn same_connection(&self, other: &AgentClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Waits until the connection closes (end of stream, an I/O error, or a protocol
    /// violation) and returns why. A closed connection stays closed: recovering
    /// means connecting again (the agent takes a new host connection at any time).
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.status.subscribe();
        match rx.wait_for(|s| s.closed.is_some()).await {
            Ok(s) => s.closed.clone().unwrap_or_default(),
            // The sender lives as long as `self`; unreachable, but not a panic.
            Err(_) => self.inner.disconnected().to_string(),
        }
    }

    /// The deadline of a request (and of a stream's start).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.inner.timeout_ms.load(Ordering::Relaxed))
    }

    /// Sets the deadline of every later request on this connection (all clones share
    /// it); the default is [`DEFAULT_TIMEOUT`].
    pub fn set_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.inner.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// This client with [`set_timeout`](Self::set_timeout) applied.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.set_timeout(timeout);
        self
    }

    async fn request(
        &self,
        op: &'static str,
        msg: impl FnOnce(u64) -> HostMessage,
    ) -> Result<GuestMessage, ProtoError> {
        self.request_within(op, self.timeout(), msg).await
    }

    /// Sends a request and waits for its reply, all within `timeout`.
    async fn request_within(
        &self,
        op: &'static str,
        timeout: Duration,
        msg: impl FnOnce(u64) -> HostMessage,
    ) -> Result<GuestMessage, ProtoError> {
        let exchange = async {
            let mut reg = self.inner.register(op, false, false)?;
            self.inner.send_data(&msg(reg.id)).await?;
            match reg.rx.recv().await {
                Some(reply) => reply,
                None => Err(self.inner.disconnected()),
            }
        };
        deadline(op, timeout, exchange).await
    }

    /// Round-trip time of a Ping, which must come within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, ProtoError> {
        let start = Instant::now();
        let reply = self
            .request_within("ping", timeout, |id| HostMessage::Ping { id })
            .await?;
        match reply {
            GuestMessage::Pong { .. } => Ok(start.elapsed()),
            other => Err(reply_error("ping", other)),
        }
    }

    /// Starts a command; its events arrive on the returned handle. Dropping the handle
    /// before the `Exit` event kills the command's process group. The first event
    /// (`Started`, or the error that it could not start) must come within the
    /// client's timeout, else [`ExecHandle::next_event`] fails with
    /// [`ProtoError::Timeout`]; after that the command runs as long as it runs. A
    /// command with its own timeout must also end (the agent kills it then) within
    /// that timeout plus the client's, so a guest that hangs mid-command cannot
    /// hold its reader forever.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, ProtoError> {
        let with_stdin = req.stdin;
        let timeout = self.timeout();
        let now = tokio::time::Instant::now();
        let start_by = now + timeout;
        let end_by = req
            .timeout_ms
            .map(|ms| Duration::from_millis(ms).saturating_add(timeout))
            .and_then(|limit| Some((now.checked_add(limit)?, limit)));
        let mut reg = self.inner.register("exec", true, with_stdin)?;
        reg.guard.cancel_on_drop = true;
        deadline(
            "exec",
            timeout,
            self.inner.send_data(&HostMessage::Exec { id: reg.id, req }),
        )
        .await?;
        let stdin = with_stdin.then(|| ExecStdin {
            id: reg.id,
            client: self.clone(),
            credit: reg.credit.clone(),
            closed: false,
        });
        Ok(ExecHandle {
            id: reg.id,
            rx: reg.rx,
            inbound: reg.inbound,
            stdin,
            start: Some((start_by, timeout)),
            end: end_by,
            done: false,
            _guard: reg.guard,
            client: self.clone(),
        })
    }

    /// Starts `req.argv` (or the login shell) on a pseudo-terminal in the guest and
    /// waits until it runs: a program that cannot be started fails here.
    ///
    /// The session's first event is [`PtyEvent::Started`], then output, then
    /// [`PtyEvent::Exit`]. Use [`PtySession::split`] to read output and send input from
    /// different tasks. Dropping the session (or its [`PtyReader`]) before `Exit` hangs
    /// it up: SIGHUP, then SIGKILL for everything left in its session.
    pub async fn pty(&self, req: PtyRequest) -> Result<PtySession, ProtoError> {
        const OP: &str = "pty";
        let mut reg = self.inner.register(OP, true, true)?;
        reg.guard.cancel_on_drop = true;
        let id = reg.id;
        let first = deadline(OP, self.timeout(), async {
            self.inner.send_data(&HostMessage::Pty { id, req }).await?;
            match reg.rx.recv().await {
                None => Err(self.inner.disconnected()),
                Some(reply) => reply,
            }
        })
        .await?;
        let pid = match &first {
            GuestMessage::Pty {
                event: PtyEvent::Started { pid },
                ..
            } => *pid,
            _ => {
                // Error replies are terminal: nothing is left to cancel.
                reg.guard.cancel_on_drop = false;
                return Err(reply_error(OP, first));
            }
        };
        let writer = PtyWriter {
            id,
            client: self.clone(),
            credit: reg.credit,
        };
        Ok(PtySession {
            reader: PtyReader {
                id,
                pid,
                rx: reg.rx,
                inbound: reg.inbound,
                first: Some(PtyEvent::Started { pid }),
                done: false,
                credit: writer.credit.clone(),
                _guard: reg.guard,
                client: self.clone(),
            },
            writer,
        })
    }

    /// Uploads `reader` to `path` in the guest (parent directory must exist; written to a
    /// temp file and renamed). Returns the bytes written. Each wait on the agent
    /// (queueing a chunk, credit for the next, the final answer) has the client's
    /// timeout; reading `reader` goes at its own pace.
    pub async fn write_file(
        &self,
        path: &str,
        mode: u32,
        mut reader: impl AsyncRead + Unpin,
    ) -> Result<u64, ProtoError> {
        const OP: &str = "write_file";
        let timeout = self.timeout();
        let mut reg = self.inner.register(OP, false, true)?;
        reg.guard.cancel_on_drop = true;
        let id = reg.id;
        deadline(
            OP,
            timeout,
            self.inner.send_data(&HostMessage::WriteFile {
                id,
                path: path.to_owned(),
                mode,
            }),
        )
        .await?;
        let mut buf = vec![0u8; FILE_CHUNK_LEN];
        let mut sent = 0u64;
        loop {
            let n = read_full(&mut reader, &mut buf).await.map_err(|source| {
                ProtoError::WriteFileSource {
                    path: path.to_owned(),
                    source,
                }
            })?;
            if n == 0 {
                deadline(
                    OP,
                    timeout,
                    self.inner.send_data(&HostMessage::WriteEnd { id }),
                )
                .await?;
                break;
            }
            // n <= FILE_CHUNK_LEN, fits u32.
            let credit = async { Ok(reg.credit.acquire_many(n as u32).await) };
            match deadline(OP, timeout, credit).await? {
                Ok(permit) => permit.forget(),
                // Closed: the agent already answered (an error); read it below.
                Err(_) => break,
            }
            deadline(
                OP,
                timeout,
                self.inner.send_data(&HostMessage::WriteChunk {
                    id,
                    data: buf[..n].to_vec(),
                }),
            )
            .await?;
            sent += n as u64;
        }
        let answer = async {
            reg.rx
                .recv()
                .await
                .ok_or_else(|| self.inner.disconnected())?
        };
        let reply = deadline(OP, timeout, answer).await?;
        reg.guard.cancel_on_drop = false;
        match reply {
            GuestMessage::WriteDone { size, .. } if size == sent => Ok(size),
            GuestMessage::WriteDone { size, .. } => Err(ProtoError::StreamBroken {
                op: OP,
                id,
                detail: format!("sent {sent} bytes but the agent wrote {size}"),
            }),
            other => Err(reply_error(OP, other)),
        }
    }

    /// Streams a file from the guest in chunks of up to [`FILE_CHUNK_LEN`] bytes. A missing
    /// or unreadable file fails here; later failures arrive as stream items.
    pub async fn read_file(&self, path: &str) -> Result<ReadFileStream, ProtoError> {
        const OP: &str = "read_file";
        let timeout = self.timeout();
        let mut reg = self.inner.register(OP, true, false)?;
        reg.guard.cancel_on_drop = true;
        deadline(
            OP,
            timeout,
            self.inner.send_data(&HostMessage::ReadFile {
                id: reg.id,
                path: path.to_owned(),
            }),
        )
        .await?;
        let mut stream = ReadFileStream {
            id: reg.id,
            rx: reg.rx,
            inbound: reg.inbound,
            received: 0,
            first: None,
            done: false,
            guard: reg.guard,
            client: self.clone(),
        };
        // Surface open errors from the call itself.
        let first = async {
            match stream.rx.recv().await {
                None => Err(self.inner.disconnected()),
                Some(reply) => reply,
            }
        };
        stream.first = Some(deadline(OP, timeout, first).await?);
        if let Some(GuestMessage::Error { .. }) = &stream.first {
            stream.guard.cancel_on_drop = false;
            if let Some(msg) = stream.first.take() {
                return Err(reply_error(OP, msg));
            }
        }
        Ok(stream)
    }

    /// A metrics sample of the guest.
    pub async fn metrics(&self) -> Result<Metrics, ProtoError> {
        match self
            .request("metrics", |id| HostMessage::Metrics { id })
            .await?
        {
            GuestMessage::Metrics { metrics, .. } => Ok(metrics),
            other => Err(reply_error("metrics", other)),
        }
    }

    /// Asks the agent to sync and power off (or reboot); returns once acknowledged.
    pub async fn shutdown(&self, reboot: bool) -> Result<(), ProtoError> {
        match self
            .request("shutdown", |id| HostMessage::Shutdown { id, reboot })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error("shutdown", other)),
        }
    }

    /// Sets the guest's realtime clock (e.g. after restoring a snapshot).
    pub async fn set_time(&self, time: std::time::SystemTime) -> Result<(), ProtoError> {
        let unix_nanos = time
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        match self
            .request("set_time", |id| HostMessage::SetTime { id, unix_nanos })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error("set_time", other)),
        }
    }

    /// The dev commands' statuses as the agent pushes them (capability
    /// [`crate::CAP_DEV_EVENTS`]): `None` until the first push; the receiver sees
    /// each change (only the latest one when several arrive between two reads).
    pub fn dev_changes(&self) -> watch::Receiver<Option<Vec<crate::DevStatus>>> {
        self.inner.dev.subscribe()
    }

    /// Sends everything a guest needs after a snapshot restore in one request
    /// (capability [`crate::CAP_RESTORED`]; check [`AgentClient::supports`] first).
    pub async fn restored(&self, restored: crate::Restored) -> Result<(), ProtoError> {
        const OP: &str = "restored";
        if !self.supports(crate::CAP_RESTORED) {
            return Err(ProtoError::Unsupported {
                op: OP,
                agent_version: self.hello().map(|h| h.version).unwrap_or(0),
                capability: crate::CAP_RESTORED,
            });
        }
        match self
            .request(OP, |id| HostMessage::Restored { id, restored })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error(OP, other)),
        }
    }
}

/// Dev commands and network configuration.
impl AgentClient {
    /// Starts dev command `spec.name` and returns once it is spawned. A dev command of
    /// that name is stopped first (SIGTERM, SIGKILL after the grace period) and replaced;
    /// its log continues in a fresh file (the previous runs rotate to `.1` and `.2`).
    pub async fn dev_start(&self, spec: DevSpec) -> Result<(), ProtoError> {
        const OP: &str = "dev_start";
        let timeout = self.timeout() + DEV_STOP_ALLOWANCE;
        match self
            .request_within(OP, timeout, |id| HostMessage::DevStart { id, spec })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error(OP, other)),
        }
    }

    /// Stops dev command `name` (its whole process group) and returns once it is gone.
    /// It stays listed as [`DevState::Stopped`](crate::DevState::Stopped), its log
    /// readable, until a `dev_start` of that name replaces it.
    pub async fn dev_stop(&self, name: &str) -> Result<(), ProtoError> {
        const OP: &str = "dev_stop";
        let timeout = self.timeout() + DEV_STOP_ALLOWANCE;
        match self
            .request_within(OP, timeout, |id| HostMessage::DevStop {
                id,
                name: name.to_owned(),
            })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error(OP, other)),
        }
    }

    /// Status of every dev command, sorted by name.
    pub async fn dev_list(&self) -> Result<Vec<DevStatus>, ProtoError> {
        const OP: &str = "dev_list";
        match self.request(OP, |id| HostMessage::DevList { id }).await? {
            GuestMessage::DevList { items, .. } => Ok(items),
            other => Err(reply_error(OP, other)),
        }
    }

    /// Streams the log of dev command `name`, starting `tail_bytes` before its end
    /// (`u64::MAX`: all of it). Without `follow` the stream ends at the current end;
    /// with it, it goes on with new output until dropped, or until the command is
    /// replaced by a `dev_start`. Errors of the agent (an unknown name) arrive as the
    /// first item. Dropping the stream cancels it in the agent.
    pub async fn dev_logs(
        &self,
        name: &str,
        follow: bool,
        tail_bytes: u64,
    ) -> Result<DevLogStream, ProtoError> {
        let mut reg = self.inner.register("dev_logs", true, false)?;
        reg.guard.cancel_on_drop = true;
        self.inner
            .send_data(&HostMessage::DevLogs {
                id: reg.id,
                name: name.to_owned(),
                follow,
                tail_bytes,
            })
            .await?;
        Ok(DevLogStream {
            id: reg.id,
            rx: reg.rx,
            inbound: reg.inbound,
            done: false,
            guard: reg.guard,
            client: self.clone(),
        })
    }

    /// Configures the guest's network interface: MAC, IPv4 address, default route,
    /// name servers (and hostname). Idempotent: each call replaces the previous setup,
    /// so send it after every boot and after every restore of a memory snapshot.
    pub async fn net_config(&self, cfg: NetConfig) -> Result<(), ProtoError> {
        const OP: &str = "net_config";
        match self
            .request(OP, |id| HostMessage::NetConfig { id, cfg })
            .await?
        {
            GuestMessage::Done { .. } => Ok(()),
            other => Err(reply_error(OP, other)),
        }
    }
}

/// Runs `fut` with deadline `timeout`; running out is [`ProtoError::Timeout`] for `op`.
async fn deadline<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, ProtoError>>,
) -> Result<T, ProtoError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ProtoError::Timeout { op, after: timeout }))
}

async fn read_full(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// A running command. Events arrive in order; `Exit` is last.
pub struct ExecHandle {
    id: u64,
    rx: mpsc::Receiver<Reply>,
    inbound: Arc<AtomicU64>,
    stdin: Option<ExecStdin>,
    /// Until the first event: when it must have come, and the timeout that made it.
    start: Option<(tokio::time::Instant, Duration)>,
    /// For a command with a timeout: when its exit must have come, and the limit.
    end: Option<(tokio::time::Instant, Duration)>,
    done: bool,
    _guard: PendingGuard,
    client: AgentClient,
}

/// Everything a finished command produced (see [`ExecHandle::wait`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Pid in the guest.
    pub pid: u32,
    /// All stdout bytes.
    pub stdout: Vec<u8>,
    /// All stderr bytes.
    pub stderr: Vec<u8>,
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// Killed because of its timeout.
    pub timed_out: bool,
    /// Bytes dropped from the front of `stdout` and `stderr` to keep each within the
    /// limit of [`ExecHandle::wait_tail`] (0: the output is complete).
    pub dropped: u64,
}

/// Most bytes of stdout (and of stderr) [`ExecHandle::wait`] keeps: the tail.
pub const EXEC_OUTPUT_MAX: usize = 16 << 20;

/// Appends `data` to `buf`, keeping only the last `max` bytes; returns bytes dropped.
fn append_tail(buf: &mut Vec<u8>, data: &[u8], max: usize) -> u64 {
    buf.extend_from_slice(data);
    // Trim in batches (at twice the limit) so appending stays amortised linear.
    if buf.len() > max.saturating_mul(2).max(1) {
        let cut = buf.len() - max;
        buf.drain(..cut);
        return cut as u64;
    }
    0
}

fn trim_tail(buf: &mut Vec<u8>, max: usize) -> u64 {
    let cut = buf.len().saturating_sub(max);
    buf.drain(..cut);
    cut as u64
}

impl ExecOutput {
    /// Exited normally with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl ExecHandle {
    /// The request id of this exec.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after `Exit` or after an error was returned. Fails with
    /// [`ProtoError::Timeout`] when the agent does not report the start in time, or
    /// the exit of a command with a timeout (see [`AgentClient::exec`]); the command
    /// is then cancelled with the handle.
    pub async fn next_event(&mut self) -> Option<Result<ExecEvent, ProtoError>> {
        if self.done {
            return None;
        }
        let received = match self.start.or(self.end) {
            Some((by, after)) => match tokio::time::timeout_at(by, self.rx.recv()).await {
                Ok(r) => r,
                Err(_) => {
                    self.done = true;
                    return Some(Err(ProtoError::Timeout { op: "exec", after }));
                }
            },
            None => self.rx.recv().await,
        };
        self.start = None;
        let item = match received {
            Some(item) => item,
            None => Err(self.client.inner.disconnected()),
        };
        let event = match item {
            Ok(GuestMessage::Exec { event, .. }) => event,
            Ok(other) => {
                self.done = true;
                return Some(Err(reply_error("exec", other)));
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        match &event {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => {
                self.inbound.fetch_sub(d.len() as u64, Ordering::AcqRel);
                // d.len() <= MAX_FRAME_LEN, fits u32.
                let _ = self.client.inner.send_ctl(&HostMessage::Credit {
                    id: self.id,
                    bytes: d.len() as u32,
                });
            }
            ExecEvent::Exit { .. } => self.done = true,
            ExecEvent::Started { .. } => {}
        }
        Some(Ok(event))
    }

    /// Takes the stdin writer (only when the request had `stdin: true`).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Sends `signal` to the command's process group.
    pub fn kill(&self, signal: i32) -> Result<(), ProtoError> {
        self.client.inner.send_ctl(&HostMessage::Kill {
            id: self.id,
            signal,
        })
    }

    /// Collects the output until exit (closes stdin first if it was not taken): the
    /// last [`EXEC_OUTPUT_MAX`] bytes of stdout and of stderr (see
    /// [`ExecOutput::dropped`]).
    pub async fn wait(self) -> Result<ExecOutput, ProtoError> {
        self.wait_tail(EXEC_OUTPUT_MAX).await
    }

    /// [`wait`](Self::wait) keeping the last `max` bytes of stdout and of stderr: a
    /// command cannot make the caller hold more than that, however much it prints.
    pub async fn wait_tail(mut self, max: usize) -> Result<ExecOutput, ProtoError> {
        if let Some(stdin) = self.stdin.take() {
            stdin.close().await?;
        }
        let mut out = ExecOutput::default();
        while let Some(event) = self.next_event().await {
            match event? {
                ExecEvent::Started { pid } => out.pid = pid,
                ExecEvent::Stdout(d) => out.dropped += append_tail(&mut out.stdout, &d, max),
                ExecEvent::Stderr(d) => out.dropped += append_tail(&mut out.stderr, &d, max),
                ExecEvent::Exit {
                    code,
                    signal,
                    timed_out,
                } => {
                    out.dropped += trim_tail(&mut out.stdout, max);
                    out.dropped += trim_tail(&mut out.stderr, max);
                    out.code = code;
                    out.signal = signal;
                    out.timed_out = timed_out;
                    return Ok(out);
                }
            }
        }
        Err(ProtoError::StreamBroken {
            op: "exec",
            id: self.id,
            detail: "no exit event".into(),
        })
    }
}

/// Writes to a command's stdin, respecting the agent's credit window.
pub struct ExecStdin {
    id: u64,
    client: AgentClient,
    credit: Arc<Semaphore>,
    closed: bool,
}

impl ExecStdin {
    /// Sends bytes; waits while the agent has not consumed earlier ones.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ProtoError> {
        for chunk in data.chunks(EXEC_CHUNK_LEN) {
            // chunk.len() <= EXEC_CHUNK_LEN, fits u32.
            let permit = self
                .credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| ProtoError::StreamBroken {
                    op: "exec stdin",
                    id: self.id,
                    detail: "the command already finished".into(),
                })?;
            permit.forget();
            self.client
                .inner
                .send_data(&HostMessage::Stdin {
                    id: self.id,
                    data: chunk.to_vec(),
                    eof: false,
                })
                .await?;
        }
        Ok(())
    }

    /// Closes stdin (the command sees end of file).
    pub async fn close(mut self) -> Result<(), ProtoError> {
        self.closed = true;
        self.client
            .inner
            .send_data(&HostMessage::Stdin {
                id: self.id,
                data: Vec::new(),
                eof: true,
            })
            .await
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.client.inner.send_ctl(&HostMessage::Stdin {
                id: self.id,
                data: Vec::new(),
                eof: true,
            });
        }
    }
}

/// Chunks of a file being read from the guest; ends after the agent's end marker.
pub struct ReadFileStream {
    id: u64,
    rx: mpsc::Receiver<Reply>,
    inbound: Arc<AtomicU64>,
    received: u64,
    first: Option<GuestMessage>,
    done: bool,
    guard: PendingGuard,
    client: AgentClient,
}

impl ReadFileStream {
    fn handle(&mut self, item: Reply) -> Option<Result<Bytes, ProtoError>> {
        const OP: &str = "read_file";
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        match msg {
            GuestMessage::FileChunk { data, .. } => {
                let len = data.len();
                self.received += len as u64;
                self.inbound.fetch_sub(len as u64, Ordering::AcqRel);
                // len <= MAX_FRAME_LEN, fits u32.
                let _ = self.client.inner.send_ctl(&HostMessage::Credit {
                    id: self.id,
                    bytes: len as u32,
                });
                Some(Ok(Bytes::from(data)))
            }
            GuestMessage::FileEnd { size, .. } => {
                self.done = true;
                self.guard.cancel_on_drop = false;
                if size == self.received {
                    None
                } else {
                    Some(Err(ProtoError::StreamBroken {
                        op: OP,
                        id: self.id,
                        detail: format!("agent sent {size} bytes but {} arrived", self.received),
                    }))
                }
            }
            other => {
                self.done = true;
                self.guard.cancel_on_drop = false;
                Some(Err(reply_error(OP, other)))
            }
        }
    }
}

impl Stream for ReadFileStream {
    type Item = Result<Bytes, ProtoError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(self.handle(Ok(first)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(item)) => Poll::Ready(self.handle(item)),
            Poll::Ready(None) => {
                self.done = true;
                let err = self.client.inner.disconnected();
                Poll::Ready(Some(Err(err)))
            }
        }
    }
}

/// The log of a dev command (see [`AgentClient::dev_logs`]); dropping it before its end
/// cancels the stream in the agent.
pub struct DevLogStream {
    id: u64,
    rx: mpsc::Receiver<Reply>,
    inbound: Arc<AtomicU64>,
    done: bool,
    guard: PendingGuard,
    client: AgentClient,
}

impl DevLogStream {
    /// The request id of this stream.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn handle(&mut self, item: Reply) -> Option<Result<Bytes, ProtoError>> {
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        match msg {
            GuestMessage::DevLog { data, .. } => {
                let len = data.len();
                self.inbound.fetch_sub(len as u64, Ordering::AcqRel);
                // len <= MAX_FRAME_LEN, fits u32.
                let _ = self.client.inner.send_ctl(&HostMessage::Credit {
                    id: self.id,
                    bytes: len as u32,
                });
                Some(Ok(Bytes::from(data)))
            }
            GuestMessage::Done { .. } => {
                self.done = true;
                self.guard.cancel_on_drop = false;
                None
            }
            other => {
                self.done = true;
                self.guard.cancel_on_drop = false;
                Some(Err(reply_error("dev_logs", other)))
            }
        }
    }
}

impl Stream for DevLogStream {
    type Item = Result<Bytes, ProtoError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(item)) => Poll::Ready(self.handle(item)),
            Poll::Ready(None) => {
                self.done = true;
                let err = self.client.inner.disconnected();
                Poll::Ready(Some(Err(err)))
            }
        }
    }
}

/// An interactive program on a pseudo-terminal in the guest (see [`AgentClient::pty`]).
///
/// Reading events needs `&mut self`; input, resize and signals need only `&self`. To
/// pump input and output from different tasks, [`split`](Self::split) the session or
/// take a [`writer`](Self::writer) clone.
pub struct PtySession {
    reader: PtyReader,
    writer: PtyWriter,
}

impl PtySession {
    /// The request id of this session.
    pub fn id(&self) -> u64 {
        self.reader.id
    }

    /// Pid of the program in the guest (it leads its own session).
    pub fn pid(&self) -> u32 {
        self.reader.pid
    }

    /// The next event; `None` after `Exit` or after an error was returned.
    pub async fn next_event(&mut self) -> Option<Result<PtyEvent, ProtoError>> {
        self.reader.next_event().await
    }

    /// Sends keyboard input (see [`PtyWriter::send`]).
    pub async fn send(&self, data: &[u8]) -> Result<(), ProtoError> {
        self.writer.send(data).await
    }

    /// Sets the window size (see [`PtyWriter::resize`]).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProtoError> {
        self.writer.resize(rows, cols)
    }

    /// Sends `signal` to the program's process group (see [`PtyWriter::kill`]).
    pub fn kill(&self, signal: i32) -> Result<(), ProtoError> {
        self.writer.kill(signal)
    }

    /// A handle for input, resize and signals, usable from another task.
    pub fn writer(&self) -> PtyWriter {
        self.writer.clone()
    }

    /// Splits the session into its event reader and a cloneable input handle. The
    /// reader owns the session: dropping it hangs the session up.
    pub fn split(self) -> (PtyReader, PtyWriter) {
        (self.reader, self.writer)
    }
}

/// The output side of a [`PtySession`]; owns the session.
///
/// Dropping it before `Exit` hangs the session up in the guest (SIGHUP to the
/// program's process group and the terminal's foreground group, then SIGKILL to every
/// process left in the session); its [`PtyWriter`]s then fail.
pub struct PtyReader {
    id: u64,
    pid: u32,
    rx: mpsc::Receiver<Reply>,
    inbound: Arc<AtomicU64>,
    first: Option<PtyEvent>,
    done: bool,
    /// Input credits, closed when the reader goes away so writers stop.
    credit: Arc<Semaphore>,
    _guard: PendingGuard,
    client: AgentClient,
}

impl PtyReader {
    /// The request id of this session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pid of the program in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `None` after `Exit` or after an error was returned. Output is
    /// flow-controlled: the agent pauses the program's output while events are not read.
    pub async fn next_event(&mut self) -> Option<Result<PtyEvent, ProtoError>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        if self.done {
            return None;
        }
        let item = match self.rx.recv().await {
            Some(item) => item,
            None => Err(self.client.inner.disconnected()),
        };
        let event = match item {
            Ok(GuestMessage::Pty { event, .. }) => event,
            Ok(other) => {
                self.done = true;
                return Some(Err(reply_error("pty", other)));
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        match &event {
            PtyEvent::Output(d) => {
                self.inbound.fetch_sub(d.len() as u64, Ordering::AcqRel);
                // d.len() <= MAX_FRAME_LEN, fits u32.
                let _ = self.client.inner.send_ctl(&HostMessage::Credit {
                    id: self.id,
                    bytes: d.len() as u32,
                });
            }
            PtyEvent::Exit { .. } => self.done = true,
            PtyEvent::Started { .. } => {}
        }
        Some(Ok(event))
    }
}

impl Drop for PtyReader {
    fn drop(&mut self) {
        self.credit.close();
    }
}

/// The input side of a [`PtySession`]: keyboard input, window size, signals. Cheap to
/// clone; every clone acts on the same session. Fails once the session ended.
#[derive(Clone)]
pub struct PtyWriter {
    id: u64,
    client: AgentClient,
    credit: Arc<Semaphore>,
}

impl PtyWriter {
    /// The request id of this session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends keyboard input as typed; control keys are plain bytes (`0x03` Ctrl-C, which
    /// the guest's line discipline turns into SIGINT; `0x04` Ctrl-D; `0x1a` Ctrl-Z).
    /// Waits while the agent has not written earlier input (the program is not reading).
    /// Concurrent sends from several clones may interleave at chunk boundaries.
    pub async fn send(&self, data: &[u8]) -> Result<(), ProtoError> {
        for chunk in data.chunks(EXEC_CHUNK_LEN) {
            // chunk.len() <= EXEC_CHUNK_LEN, fits u32.
            let permit = self
                .credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| ProtoError::StreamBroken {
                    op: "pty input",
                    id: self.id,
                    detail: "the session already ended".into(),
                })?;
            permit.forget();
            self.client
                .inner
                .send_data(&HostMessage::PtyInput {
                    id: self.id,
                    data: chunk.to_vec(),
                })
                .await?;
        }
        Ok(())
    }

    /// Sets the terminal's window size; the program's foreground process group gets
    /// SIGWINCH. Sent ahead of queued input.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProtoError> {
        self.client.inner.send_ctl(&HostMessage::PtyResize {
            id: self.id,
            rows,
            cols,
        })
    }

    /// Sends `signal` to the program's process group (the session leader's group; a job
    /// a shell runs in the foreground has its own group: use Ctrl-C input for that).
    pub fn kill(&self, signal: i32) -> Result<(), ProtoError> {
        self.client.inner.send_ctl(&HostMessage::Kill {
            id: self.id,
            signal,
        })
    }
}

/// TCP streams into the guest.
impl AgentClient {
    /// Opens a TCP connection from the agent to `127.0.0.1:port` in the guest; see
    /// [`open_stream_to`](Self::open_stream_to).
    pub async fn open_stream(
        &self,
        port: u16,
        timeout: Duration,
    ) -> Result<GuestStream, ProtoError> {
        self.open_stream_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout)
            .await
    }

    /// Opens a TCP connection from the agent to `addr` in the guest and returns it as a
    /// byte stream. Needs no guest network card (the bytes travel over the control
    /// channel). Fails with [`ProtoError::Unsupported`] when the agent lacks
    /// [`CAP_TCP_STREAM`], [`ProtoError::ConnectionRefused`] when nothing listens there,
    /// [`ProtoError::Timeout`] when the agent is not connected within `timeout`.
    pub async fn open_stream_to(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<GuestStream, ProtoError> {
        const OP: &str = "open_stream";
        let deadline = Instant::now() + timeout;
        let hello = self.wait_ready(timeout).await?;
        if !self.supports(CAP_TCP_STREAM) {
            return Err(ProtoError::Unsupported {
                op: OP,
                capability: CAP_TCP_STREAM,
                agent_version: hello.version,
            });
        }
        let mut reg = self.inner.register(OP, true, true)?;
        reg.guard.cancel_on_drop = true;
        let id = reg.id;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let connect_timeout_ms = u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX);
        let open = async {
            self.inner
                .send_data(&HostMessage::StreamOpen {
                    id,
                    ip: addr.ip(),
                    port: addr.port(),
                    connect_timeout_ms,
                })
                .await?;
            match reg.rx.recv().await {
                Some(reply) => reply,
                None => Err(self.inner.disconnected()),
            }
        };
        // Timing out drops the registration guard, which cancels the connect in the guest.
        let first =
            tokio::time::timeout(remaining, open)
                .await
                .map_err(|_| ProtoError::Timeout {
                    op: OP,
                    after: timeout,
                })??;
        match first {
            GuestMessage::StreamOpened { .. } => {}
            GuestMessage::Error {
                kind: ErrorKind::ConnectionRefused,
                message,
                ..
            } => {
                reg.guard.cancel_on_drop = false;
                return Err(ProtoError::ConnectionRefused { addr, message });
            }
            other => {
                reg.guard.cancel_on_drop = false;
                return Err(reply_error(OP, other));
            }
        }
        tracing::debug!(id, %addr, "guest stream open");
        Ok(GuestStream {
            id,
            addr,
            rx: reg.rx,
            inbound: reg.inbound,
            peak: reg.peak,
            chunk: Bytes::new(),
            uncredited: 0,
            read_done: false,
            read_error: None,
            credit: PollSemaphore::new(reg.credit),
            held: 0,
            tx: PollSender::new(self.inner.data_tx.clone()),
            write_closed: false,
            guard: reg.guard,
            client: self.clone(),
        })
    }
}

/// Consumed bytes are credited back to the agent in batches of at least this much
/// (or when a chunk is used up).
const CREDIT_BATCH: usize = 32 * 1024;

/// A TCP connection to a port inside the guest, relayed by the agent (see
/// [`AgentClient::open_stream`]). Implements tokio's `AsyncRead` and `AsyncWrite`, so
/// hyper or `tokio::io::copy_bidirectional` use it directly.
///
/// Both directions are flow-controlled with a window of [`STREAM_WINDOW`] bytes: the
/// agent reads from the guest socket only as far as this side has room, so the bytes
/// buffered here never exceed the window ([`buffered`](Self::buffered)); writes wait
/// while the agent has not yet written earlier data to the socket. `poll_shutdown`
/// half-closes (the guest service reads end of file); dropping the stream closes the
/// connection in the guest.
pub struct GuestStream {
    id: u64,
    addr: SocketAddr,
    rx: mpsc::Receiver<Reply>,
    /// Bytes received and not yet credited back (buffered here).
    inbound: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    /// The chunk being read.
    chunk: Bytes,
    /// Bytes read by the caller and not yet credited back.
    uncredited: usize,
    read_done: bool,
    read_error: Option<(std::io::ErrorKind, String)>,
    /// Credits for data to the guest.
    credit: PollSemaphore,
    /// Credits taken from `credit` and not yet used.
    held: usize,
    tx: PollSender<Vec<u8>>,
    write_closed: bool,
    guard: PendingGuard,
    client: AgentClient,
}

impl std::fmt::Debug for GuestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStream")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

impl GuestStream {
    /// The stream's request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The guest address the agent connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes received from the guest and buffered here (not yet read, or read and not
    /// yet credited back); never more than [`STREAM_WINDOW`].
    pub fn buffered(&self) -> u64 {
        self.inbound.load(Ordering::Acquire)
    }

    /// The highest [`buffered`](Self::buffered) value so far.
    pub fn peak_buffered(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    fn consumed(&mut self, n: usize) {
        self.uncredited += n;
        if self.uncredited >= CREDIT_BATCH || (self.chunk.is_empty() && self.uncredited > 0) {
            let bytes = self.uncredited;
            self.uncredited = 0;
            // Uncount before granting so the agent's next data never looks like excess.
            self.inbound.fetch_sub(bytes as u64, Ordering::AcqRel);
            // bytes <= STREAM_WINDOW, fits u32.
            let _ = self.client.inner.send_ctl(&HostMessage::Credit {
                id: self.id,
                bytes: bytes as u32,
            });
        }
    }

    fn fail_read(&mut self, kind: std::io::ErrorKind, message: String) {
        self.read_done = true;
        self.read_error = Some((kind, message));
        self.guard.cancel_on_drop = false;
    }

    fn broken(&self, what: &str) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            format!("stream {} to {} in the guest {what}", self.id, self.addr),
        )
    }
}

impl AsyncRead for GuestStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.chunk.is_empty() {
                let n = buf.remaining().min(this.chunk.len());
                buf.put_slice(&this.chunk.split_to(n));
                this.consumed(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(match &this.read_error {
                    Some((kind, message)) => Err(std::io::Error::new(*kind, message.clone())),
                    None => Ok(()),
                });
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Ok(GuestMessage::StreamData { data, .. })) => this.chunk = Bytes::from(data),
                Some(Ok(GuestMessage::StreamEof { .. })) => this.read_done = true,
                Some(Ok(other)) => {
                    let e = reply_error("guest stream", other);
                    this.fail_read(std::io::ErrorKind::ConnectionReset, e.to_string());
                }
                Some(Err(e)) => {
                    let kind = match e {
                        ProtoError::FlowControl { .. } => std::io::ErrorKind::InvalidData,
                        _ => std::io::ErrorKind::ConnectionAborted,
                    };
                    this.fail_read(kind, e.to_string());
                }
                None => {
                    let e = this.client.inner.disconnected();
                    this.fail_read(std::io::ErrorKind::ConnectionAborted, e.to_string());
                }
            }
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(this.broken("is shut down for writing")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held == 0 {
            // Closed when the stream failed or the connection ended.
            match std::task::ready!(this.credit.poll_acquire(cx)) {
                Some(permit) => permit.forget(),
                None => return Poll::Ready(Err(this.broken("is closed"))),
            }
            this.held = 1;
            let want = buf.len().min(STREAM_CHUNK_LEN) - 1;
            let extra = want.min(this.credit.available_permits());
            if extra > 0
                // extra <= STREAM_CHUNK_LEN, fits u32.
                && let Ok(permit) = this.credit.clone_inner().try_acquire_many(extra as u32)
            {
                permit.forget();
                this.held += extra;
            }
        }
        if std::task::ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.broken("lost its agent connection")));
        }
        let n = this.held.min(buf.len()).min(STREAM_CHUNK_LEN);
        let frame = encode_frame(&HostMessage::StreamData {
            id: this.id,
            data: buf[..n].to_vec(),
        })
        .map_err(std::io::Error::other)?;
        if this.tx.send_item(frame).is_err() {
            return Poll::Ready(Err(this.broken("lost its agent connection")));
        }
        this.held -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Written data is queued to the connection's writer, which sends it in order.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        if std::task::ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.broken("lost its agent connection")));
        }
        let frame =
            encode_frame(&HostMessage::StreamEof { id: this.id }).map_err(std::io::Error::other)?;
        if this.tx.send_item(frame).is_err() {
            return Poll::Ready(Err(this.broken("lost its agent connection")));
        }
        this.write_closed = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for GuestStream {
    fn drop(&mut self) {
        // Cancel behind the queued data when there is room, so data written before the
        // drop still reaches the guest; the guard's Cancel (control queue) is the fallback.
        if self.guard.cancel_on_drop
            && let Ok(frame) = encode_frame(&HostMessage::Cancel { id: self.id })
            && self.client.inner.data_tx.try_send(frame).is_ok()
        {
            self.guard.cancel_on_drop = false;
        }
    }
}
