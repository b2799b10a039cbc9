//! A minimal QMP client. Hand-written because we send a handful of commands; the
//! `qapi` crate generates the whole QEMU schema for that.
//!
//! One reader task parses every line QEMU sends: replies are matched to their
//! command by the `id` we attach (QEMU echoes it), asynchronous events go to
//! subscribers (a bounded broadcast; slow subscribers lose the oldest), and a
//! socket that closes fails every outstanding command at once. One writer task
//! writes whole lines, so a command abandoned at its deadline never leaves half a
//! line in the stream. Every command has a deadline: the client's default, or one
//! given per call.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::VmmError;

/// Longest QMP line we accept; QEMU's answers to our commands are far smaller.
const MAX_LINE: usize = 1 << 20;

/// Default deadline of one QMP command (see [`Qmp::connect_with_timeout`]).
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// One command line for the writer task, with a file descriptor to pass along
/// (`SCM_RIGHTS`) for commands such as `getfd`.
struct Outgoing {
    line: Vec<u8>,
    fd: Option<OwnedFd>,
}

/// Commands queued for the writer task.
const WRITE_QUEUE: usize = 16;

/// Events kept for subscribers that have not read them yet.
const EVENT_QUEUE: usize = 64;

/// An asynchronous QMP event (`{"event": ..., "data": ..., "timestamp": ...}`).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `STOP`, `RESUME`.
    pub name: String,
    /// The event's `data` object (`null` when absent).
    pub data: Value,
}

/// How a command ended, as the reader task reports it.
type Outcome = Result<Value, Failure>;

/// Why a command failed, before it is turned into a [`VmmError`] naming the command.
#[derive(Debug, Clone)]
enum Failure {
    /// QEMU answered with an error object.
    Error(String),
    /// The socket closed (or broke) before the answer.
    Closed(String),
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Outcome>>,
    /// Set once the socket closed; every later command fails at once with it.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<QmpEvent>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic mid-update of a plain map.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the session closed and fails every outstanding command.
    fn close(&self, reason: String) {
        let pending: Vec<_> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.clone());
            }
            st.pending.drain().map(|(_, tx)| tx).collect()
        };
        for tx in pending {
            let _ = tx.send(Err(Failure::Closed(reason.clone())));
        }
    }

    fn dispatch(&self, msg: Value) {
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let _ = self.events.send(QmpEvent {
                name: name.to_owned(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            });
            return;
        }
        let outcome = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(e) = msg.get("error") {
            Err(Failure::Error(
                e.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned(),
            ))
        } else {
            tracing::debug!(%msg, "unexpected qmp message ignored");
            return;
        };
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            // QEMU answers without an id only to input it could not parse.
            tracing::warn!(%msg, "qmp reply without an id ignored");
            return;
        };
        match self.lock().pending.remove(&id) {
            Some(tx) => {
                let _ = tx.send(outcome);
            }
            // Its command gave up at the deadline.
            None => tracing::debug!(id, "late qmp reply dropped"),
        }
    }
}

/// A connected QMP session. Commands may run concurrently; dropping the session
/// closes the socket.
pub struct Qmp {
    socket: PathBuf,
    run_dir: PathBuf,
    shared: Arc<Shared>,
    write_tx: mpsc::Sender<Outgoing>,
    next_id: AtomicU64,
    timeout: Duration,
    tasks: [JoinHandle<()>; 2],
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.socket)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, with the default
    /// deadline ([`DEFAULT_QMP_TIMEOUT`]) for every command.
    pub async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
        Self::connect_with_timeout(socket, DEFAULT_QMP_TIMEOUT).await
    }

    /// Connects with `timeout` as the default deadline of every command (the
    /// greeting included).
    pub async fn connect_with_timeout(socket: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmmError::Qmp {
                op: "connect".into(),
                socket: socket.to_owned(),
                detail: e.to_string(),
            })?;
        Self::over(stream, socket, timeout).await
    }

    /// Runs the protocol over `stream`; `socket` names it in errors (its parent is
    /// the run directory).
    async fn over(stream: UnixStream, socket: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        let run_dir = socket.parent().unwrap_or(socket).to_owned();
        let (r, w) = stream.into_split();
        let mut reader = BufReader::new(r);
        let greeting = tokio::time::timeout(timeout, read_message(&mut reader))
            .await
            .map_err(|_| {
                VmmError::Timeout(
                    timeout,
                    format!("the qmp greeting (run dir {})", run_dir.display()),
                )
            })?
            .map_err(|e| VmmError::Qmp {
                op: "greeting".into(),
                socket: socket.to_owned(),
                detail: e.to_string(),
            })?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Qmp {
                op: "greeting".into(),
                socket: socket.to_owned(),
                detail: format!("unexpected {greeting}"),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events: broadcast::Sender::new(EVENT_QUEUE),
        });
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        let tasks = [
            tokio::spawn(reader_task(shared.clone(), reader)),
            tokio::spawn(writer_task(shared.clone(), w, write_rx)),
        ];
        let qmp = Qmp {
            socket: socket.to_owned(),
            run_dir,
            shared,
            write_tx,
            next_id: AtomicU64::new(1),
            timeout,
            tasks,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The default deadline of a command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Asynchronous events from now on. The queue is bounded: a subscriber that
    /// falls behind loses the oldest events (`RecvError::Lagged`).
    pub fn subscribe_events(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Runs one command with the default deadline and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        self.execute_timeout(command, arguments, self.timeout).await
    }

    /// Runs one command with deadline `timeout` (queueing, sending and the answer).
    /// A command that times out is forgotten: a late answer is dropped.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        self.send_command(command, arguments, None, timeout).await
    }

    /// Hands QEMU an open file as `fdname` (QMP `getfd`, the descriptor passed with
    /// `SCM_RIGHTS`), for a later `fd:NAME` migration URI. QEMU then reads or writes
    /// the file through the descriptor, so a VMM that dropped its privileges needs
    /// no access to the file's path.
    pub async fn pass_fd(&self, fdname: &str, fd: OwnedFd) -> Result<(), VmmError> {
        self.send_command(
            "getfd",
            Some(json!({ "fdname": fdname })),
            Some(fd),
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    async fn send_command(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(self.closed(command, reason.clone()));
            }
            st.pending.insert(id, tx);
        }
        // Removes the entry however this call ends (deadline, caller dropped).
        let _forget = Forget {
            shared: &self.shared,
            id,
        };
        let exchange = async {
            if self.write_tx.send(Outgoing { line, fd }).await.is_err() {
                return Err(Failure::Closed("the writer stopped".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(Failure::Closed("the reader stopped".into())))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Failure::Error(detail))) => Err(VmmError::Qmp {
                op: command.to_owned(),
                socket: self.socket.clone(),
                detail,
            }),
            Ok(Err(Failure::Closed(reason))) => Err(self.closed(command, reason)),
            Err(_) => Err(VmmError::Timeout(
                timeout,
                format!(
                    "qmp {command} (run dir {}); qemu is not answering",
                    self.run_dir.display()
                ),
            )),
        }
    }

    fn closed(&self, command: &str, reason: String) -> VmmError {
        VmmError::QmpClosed {
            op: command.to_owned(),
            run_dir: self.run_dir.clone(),
            reason,
        }
    }
}

/// Drops a pending command's entry when its caller stops waiting.
struct Forget<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

async fn reader_task<R: AsyncBufRead + Unpin>(shared: Arc<Shared>, mut reader: R) {
    loop {
        match read_message(&mut reader).await {
            Ok(msg) => shared.dispatch(msg),
            Err(ReadError::Json(e)) => tracing::warn!(error = %e, "qmp line is not json; skipped"),
            Err(ReadError::Fatal(reason)) => {
                shared.close(reason);
                return;
            }
        }
    }
}

async fn writer_task(
    shared: Arc<Shared>,
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let mut sent = 0;
        if let Some(fd) = &out.fd {
            match send_with_fd(writer.as_ref(), &out.line, fd).await {
                Ok(n) => sent = n,
                Err(e) => {
                    shared.close(format!("passing a file to qemu over the qmp socket: {e}"));
                    return;
                }
            }
        }
        if let Err(e) = writer.write_all(&out.line[sent..]).await {
            shared.close(format!("writing to the qmp socket: {e}"));
            return;
        }
    }
}

/// Sends the first part of `line` with `fd` attached (`SCM_RIGHTS`); returns how
/// many bytes went (the rest is written plainly: QEMU takes the descriptor with the
/// first byte of the command).
async fn send_with_fd(stream: &UnixStream, line: &[u8], fd: &OwnedFd) -> std::io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    use std::os::fd::AsFd;
    loop {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut ancillary = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            ancillary.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(
                stream,
                &[std::io::IoSlice::new(line)],
                &mut ancillary,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Why a line could not be read.
enum ReadError {
    /// The line is not JSON; the stream goes on.
    Json(String),
    /// The stream ended or broke.
    Fatal(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Json(s) | ReadError::Fatal(s) => f.write_str(s),
        }
    }
}

async fn read_message<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, ReadError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r
            .fill_buf()
            .await
            .map_err(|e| ReadError::Fatal(format!("reading the qmp socket: {e}")))?;
        if chunk.is_empty() {
            return Err(ReadError::Fatal("qemu closed the qmp socket".into()));
        }
        if let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..pos]);
            r.consume(pos + 1);
            break;
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        r.consume(n);
        if buf.len() > MAX_LINE {
            return Err(ReadError::Fatal(format!(
                "a qmp message is over {MAX_LINE} bytes"
            )));
        }
    }
    serde_json::from_slice(&buf).map_err(|e| ReadError::Json(format!("bad json: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// The QEMU side of a socketpair: reads our commands, writes what the test says.
    struct FakeQemu {
        lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
        w: tokio::net::unix::OwnedWriteHalf,
    }

    impl FakeQemu {
        async fn send(&mut self, v: Value) {
            let mut s = v.to_string();
            s.push('\n');
            self.w.write_all(s.as_bytes()).await.unwrap();
        }

        /// The next command we sent: (name, id).
        async fn command(&mut self) -> (String, Value) {
            let line = self.lines.next_line().await.unwrap().unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            (v["execute"].as_str().unwrap().to_owned(), v["id"].clone())
        }
    }

    /// A connected client and the fake QEMU behind it (greeting and capabilities done).
    async fn pair(timeout: Duration) -> (Qmp, FakeQemu) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (r, w) = theirs.into_split();
        let mut fake = FakeQemu {
            lines: BufReader::new(r).lines(),
            w,
        };
        let server = async {
            fake.send(json!({"QMP": {"version": {}, "capabilities": []}}))
                .await;
            let (cmd, id) = fake.command().await;
            assert_eq!(cmd, "qmp_capabilities");
            fake.send(json!({"return": {}, "id": id})).await;
        };
        let sock = Path::new("/run/atl-test/sb1/qmp.sock");
        let (qmp, ()) = tokio::join!(Qmp::over(ours, sock, timeout), server);
        (qmp.unwrap(), fake)
    }

    #[tokio::test]
    async fn replies_match_by_id_out_of_order_with_events_interleaved() {
        let (qmp, mut fake) = pair(Duration::from_secs(10)).await;
        let mut events = qmp.subscribe_events();
        let server = async {
            let (c1, id1) = fake.command().await;
            let (c2, id2) = fake.command().await;
            assert_eq!(
                (c1.as_str(), c2.as_str()),
                ("query-status", "query-migrate")
            );
            // An event first, then the second command's answer, another event, then
            // the first's.
            fake.send(json!({"event": "STOP", "timestamp": {}})).await;
            fake.send(json!({"return": {"status": "completed"}, "id": id2}))
                .await;
            fake.send(json!({"event": "RESUME", "data": {"x": 1}}))
                .await;
            fake.send(json!({"return": {"status": "running"}, "id": id1}))
                .await;
        };
        let (a, b, ()) = tokio::join!(
            qmp.execute("query-status", None),
            async {
                // Sent after the first so the fake sees them in this order.
                tokio::task::yield_now().await;
                qmp.execute("query-migrate", None).await
            },
            server
        );
        assert_eq!(a.unwrap()["status"], "running");
        assert_eq!(b.unwrap()["status"], "completed");
        let e1 = events.recv().await.unwrap();
        let e2 = events.recv().await.unwrap();
        assert_eq!(e1.name, "STOP");
        assert_eq!((e2.name.as_str(), &e2.data), ("RESUME", &json!({"x": 1})));
    }

    #[tokio::test]
    async fn an_error_reply_names_the_command() {
        let (qmp, mut fake) = pair(Duration::from_secs(10)).await;
        let server = async {
            let (_, id) = fake.command().await;
            fake.send(
                json!({"error": {"class": "GenericError", "desc": "no migration"}, "id": id}),
            )
            .await;
        };
        let (r, ()) = tokio::join!(qmp.execute("migrate_cancel", None), server);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("migrate_cancel") && e.contains("no migration"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out_and_a_late_reply_is_dropped() {
        let (qmp, mut fake) = pair(Duration::from_millis(200)).await;
        let err = qmp.execute("quit", None).await.unwrap_err();
        assert!(matches!(err, VmmError::Timeout(..)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("qmp quit") && text.contains("/run/atl-test/sb1"),
            "{text}"
        );
        // The late answer to `quit` must not be taken for the next command's.
        let (_, late) = fake.command().await;
        let server = async {
            let (_, id) = fake.command().await;
            fake.send(json!({"return": {"late": true}, "id": late}))
                .await;
            fake.send(json!({"return": {"fresh": true}, "id": id}))
                .await;
        };
        let (r, ()) = tokio::join!(
            qmp.execute_timeout("query-status", None, Duration::from_secs(10)),
            server
        );
        assert_eq!(r.unwrap(), json!({"fresh": true}));
    }

    #[tokio::test]
    async fn a_closed_socket_fails_every_pending_command_at_once() {
        let (qmp, mut fake) = pair(Duration::from_secs(3600)).await;
        let server = async {
            fake.command().await;
            fake.command().await;
            fake.command().await;
            drop(fake);
        };
        let (a, b, c, ()) = tokio::join!(
            qmp.execute("stop", None),
            qmp.execute("query-status", None),
            qmp.execute("cont", None),
            server
        );
        for (r, cmd) in [(a, "stop"), (b, "query-status"), (c, "cont")] {
            let e = r.unwrap_err();
            assert!(matches!(e, VmmError::QmpClosed { .. }), "{e:?}");
            assert!(e.to_string().contains(cmd), "{e}");
        }
        // Later commands fail at once too.
        let e = qmp.execute("quit", None).await.unwrap_err();
        assert!(matches!(e, VmmError::QmpClosed { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_garbage_line_is_skipped() {
        let (qmp, mut fake) = pair(Duration::from_secs(10)).await;
        let server = async {
            let (_, id) = fake.command().await;
            fake.w.write_all(b"not json\n").await.unwrap();
            fake.send(json!({"return": {}, "id": id})).await;
        };
        let (r, ()) = tokio::join!(qmp.execute("cont", None), server);
        r.unwrap();
    }

    async fn send_all(s: &UnixStream, mut b: &[u8]) {
        while !b.is_empty() {
            s.writable().await.unwrap();
            match s.try_write(b) {
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Reads one line from `s`, taking any descriptors sent with it.
    async fn recv_line(s: &UnixStream) -> (Value, Vec<OwnedFd>) {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let mut line = Vec::new();
        let mut fds = Vec::new();
        while !line.ends_with(b"\n") {
            s.readable().await.unwrap();
            let mut buf = [0u8; 4096];
            let got = s.try_io(Interest::READABLE, || {
                let mut space =
                    [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
                let mut anc = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let r = recvmsg(s, &mut iov, &mut anc, RecvFlags::empty())
                    .map_err(std::io::Error::from)?;
                for msg in anc.drain() {
                    if let RecvAncillaryMessage::ScmRights(rights) = msg {
                        fds.extend(rights);
                    }
                }
                Ok(r.bytes)
            });
            match got {
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        (serde_json::from_slice(&line).unwrap(), fds)
    }

    #[tokio::test]
    async fn pass_fd_hands_the_file_over_with_the_getfd_command() {
        use std::os::unix::fs::MetadataExt;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let file = std::fs::File::create(&path).unwrap();
        let server = async {
            let greet = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
            send_all(&theirs, greet).await;
            let (caps, none) = recv_line(&theirs).await;
            assert!(none.is_empty());
            let reply = format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]);
            send_all(&theirs, reply.as_bytes()).await;
            let (cmd, fds) = recv_line(&theirs).await;
            assert_eq!(cmd["execute"], "getfd");
            assert_eq!(cmd["arguments"]["fdname"], "st");
            assert_eq!(fds.len(), 1, "one descriptor with the command");
            let got = std::fs::File::from(fds.into_iter().next().unwrap());
            let want = std::fs::metadata(&path).unwrap();
            assert_eq!(got.metadata().unwrap().ino(), want.ino());
            let reply = format!("{{\"return\": {{}}, \"id\": {}}}\n", cmd["id"]);
            send_all(&theirs, reply.as_bytes()).await;
        };
        let client = async {
            let qmp = Qmp::over(ours, Path::new("/run/x/qmp.sock"), Duration::from_secs(10))
                .await
                .unwrap();
            qmp.pass_fd("st", file.into()).await
        };
        let (r, ()) = tokio::join!(client, server);
        r.unwrap();
    }
}
