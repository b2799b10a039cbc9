//! The worker: decodes host requests and serves them concurrently.
//!
//! The dispatcher never blocks on a request: exec, file and metrics work runs in
//! tasks; stream data from the host goes to per-request unbounded queues whose size
//! the credit window bounds. Dev commands (`dev`) and their logs (`devlog`) and the
//! network setup (`net`) are served the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use atelier_agent_proto::frame::SYNC_PREAMBLE_LEN;
use atelier_agent_proto::{
    CAPABILITIES, ErrorKind, FrameDecoder, GuestMessage, Hello, HostMessage, NO_REQUEST,
    PROTOCOL_VERSION, encode_frame,
};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::paths::Paths;
use crate::tcp::{self, TcpCtl, TcpMsg};
use crate::transport::{Endpoint, Incoming, Transport};
use crate::{dev, devlog, exec, files, metrics, net, pty, sys};

/// Control state of one running exec.
pub struct ExecCtl {
    /// Stdin data queue (`None` when stdin is /dev/null).
    pub stdin: Option<mpsc::UnboundedSender<(Vec<u8>, bool)>>,
    /// Output credits granted by the host.
    pub credit: Arc<Semaphore>,
    /// Process group id once spawned (0 before).
    pub pgid: Arc<AtomicI32>,
}

/// Control state of one PTY session.
pub struct PtyCtl {
    /// Input bytes to write to the terminal.
    pub input: mpsc::UnboundedSender<Vec<u8>>,
    /// Output credits granted by the host.
    pub credit: Arc<Semaphore>,
    /// Process group (and session) id of the program once spawned (0 before and after).
    pub pgid: Arc<AtomicI32>,
    /// The terminal's master side (for resizes).
    pub master: Arc<pty::Master>,
    /// Notified when the host gives up on the session.
    pub hangup: Arc<Notify>,
}

/// Control state of one dev command log stream.
pub struct DevLogCtl {
    /// Credits granted by the host.
    pub credit: Arc<Semaphore>,
    /// Notified when the host gives up on the stream.
    pub cancel: Arc<Notify>,
}

/// Messages to an upload task.
pub enum WriteMsg {
    /// File bytes.
    Chunk(Vec<u8>),
    /// End of the upload.
    End,
    /// The host gave up.
    Cancel,
}

/// A request that receives more frames after its start.
pub enum Stream {
    /// A running command.
    Exec(ExecCtl),
    /// An upload.
    Write(mpsc::UnboundedSender<WriteMsg>),
    /// A download; its credits.
    Read(Arc<Semaphore>),
    /// An interactive terminal session.
    Pty(PtyCtl),
    /// A dev command's log.
    DevLog(DevLogCtl),
    /// A TCP connection inside the guest.
    Tcp(TcpCtl),
}

/// Shared state of the worker.
pub struct Agent {
    out: mpsc::Sender<Vec<u8>>,
    streams: Mutex<HashMap<u64, Stream>>,
    hello: Hello,
    /// Inside a VM: shutdown and set_time act on the system; in tests they do not.
    pub in_vm: bool,
    /// Where the worker keeps its files.
    pub paths: Paths,
    /// The dev commands.
    pub dev: dev::Supervisor,
    /// Asks the dev-status pusher to send the current list again (a new host).
    dev_resend: Notify,
}

impl Agent {
    /// Encodes and queues a message to the host.
    pub async fn send(&self, msg: GuestMessage) {
        match encode_frame(&msg) {
            Ok(frame) => {
                let _ = self.out.send(frame).await;
            }
            Err(e) => log!("encoding a reply failed: {e}"),
        }
    }

    /// Announces this agent: its Hello, then its capabilities (protocol version 2+).
    async fn send_hello(&self) {
        self.send(GuestMessage::Hello(self.hello.clone())).await;
        let caps = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
        self.send(GuestMessage::Capabilities { caps }).await;
        self.dev_resend.notify_one();
    }

    /// Pushes the dev commands' statuses whenever they change (`DevChanged`): the
    /// check runs here in the guest twice a second (process states and
    /// `/proc/net/tcp`), so nothing crosses to the host while nothing changes.
    async fn push_dev_changes(self: Arc<Self>) {
        let mut last: Option<Vec<atelier_agent_proto::DevStatus>> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.dev_resend.notified() => last = None,
            }
            let items = self.dev.list().await;
            // Uptime moves every second; it is not a change.
            let key: Vec<_> = items
                .iter()
                .cloned()
                .map(|mut s| {
                    s.uptime_secs = 0;
                    s
                })
                .collect();
            if last.as_ref() != Some(&key) {
                self.send(GuestMessage::DevChanged { items }).await;
                last = Some(key);
            }
        }
    }

    /// Reports a failed request.
    pub async fn send_error(&self, id: u64, kind: ErrorKind, message: String) {
        self.send(GuestMessage::Error { id, kind, message }).await;
    }

    /// The stream registry.
    pub fn streams(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a finished stream.
    pub fn remove(&self, id: u64) {
        self.streams().remove(&id);
    }

    async fn handle(self: &Arc<Self>, msg: HostMessage) {
        match msg {
            HostMessage::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    log!("host speaks protocol version {version}, we speak {PROTOCOL_VERSION}");
                }
                self.send_hello().await;
            }
            HostMessage::Ping { id } => self.send(GuestMessage::Pong { id }).await,
            HostMessage::Exec { id, req } => exec::start(self.clone(), id, req),
            HostMessage::Stdin { id, data, eof } => {
                if let Some(Stream::Exec(ExecCtl {
                    stdin: Some(tx), ..
                })) = self.streams().get(&id)
                {
                    let _ = tx.send((data, eof));
                }
            }
            HostMessage::Kill { id, signal } => {
                let pgid = match self.streams().get(&id) {
                    Some(Stream::Exec(ctl)) => ctl.pgid.load(Ordering::Acquire),
                    Some(Stream::Pty(ctl)) => ctl.pgid.load(Ordering::Acquire),
                    _ => 0,
                };
                if let Err(message) = exec::signal_group(pgid, signal) {
                    self.send_error(
                        NO_REQUEST,
                        ErrorKind::Invalid,
                        format!("kill {id}: {message}"),
                    )
                    .await;
                }
            }
            HostMessage::Cancel { id } => {
                let stream = self.streams().remove(&id);
                match stream {
                    Some(Stream::Exec(ctl)) => {
                        ctl.credit.close();
                        let _ = exec::signal_group(ctl.pgid.load(Ordering::Acquire), libc::SIGKILL);
                    }
                    Some(Stream::Write(tx)) => {
                        let _ = tx.send(WriteMsg::Cancel);
                    }
                    Some(Stream::Read(credit)) => credit.close(),
                    Some(Stream::Pty(ctl)) => {
                        ctl.credit.close();
                        ctl.hangup.notify_one();
                    }
                    Some(Stream::DevLog(ctl)) => {
                        ctl.credit.close();
                        ctl.cancel.notify_one();
                    }
                    Some(Stream::Tcp(ctl)) => tcp::cancel(ctl),
                    None => {}
                }
            }
            HostMessage::Credit { id, bytes } => match self.streams().get(&id) {
                Some(Stream::Exec(ExecCtl { credit, .. }))
                | Some(Stream::Read(credit))
                | Some(Stream::Pty(PtyCtl { credit, .. }))
                | Some(Stream::DevLog(DevLogCtl { credit, .. }))
                | Some(Stream::Tcp(TcpCtl { credit, .. })) => credit.add_permits(bytes as usize),
                _ => {}
            },
            HostMessage::WriteFile { id, path, mode } => {
                files::start_write(self.clone(), id, path, mode)
            }
            HostMessage::WriteChunk { id, data } => self.to_writer(id, WriteMsg::Chunk(data)),
            HostMessage::WriteEnd { id } => self.to_writer(id, WriteMsg::End),
            HostMessage::ReadFile { id, path } => files::start_read(self.clone(), id, path),
            HostMessage::Metrics { id } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let reply = match tokio::task::spawn_blocking(metrics::collect).await {
                        Ok(Ok(metrics)) => GuestMessage::Metrics { id, metrics },
                        Ok(Err(message)) => GuestMessage::Error {
                            id,
                            kind: ErrorKind::Io,
                            message,
                        },
                        Err(e) => GuestMessage::Error {
                            id,
                            kind: ErrorKind::Internal,
                            message: format!("metrics task failed: {e}"),
                        },
                    };
                    agent.send(reply).await;
                });
            }
            HostMessage::Shutdown { id, reboot } => self.shutdown(id, reboot).await,
            HostMessage::Pty { id, req } => pty::start(self.clone(), id, req),
            HostMessage::PtyInput { id, data } => {
                if let Some(Stream::Pty(ctl)) = self.streams().get(&id) {
                    let _ = ctl.input.send(data);
                }
            }
            HostMessage::PtyResize { id, rows, cols } => {
                let result = match self.streams().get(&id) {
                    Some(Stream::Pty(ctl)) => pty::resize(&ctl.master, rows, cols),
                    _ => Ok(()),
                };
                if let Err(message) = result {
                    log!("pty {id}: {message}");
                }
            }
            HostMessage::SetTime { id, unix_nanos } => {
                let reply = if self.in_vm {
                    let ts = rustix::time::Timespec {
                        tv_sec: (unix_nanos / 1_000_000_000) as i64,
                        tv_nsec: (unix_nanos % 1_000_000_000) as _,
                    };
                    // SetTime is what the host sends after restoring a snapshot, so it
                    // also reseeds the CRNG (clones must not share random streams).
                    if let Err(e) = crate::sys::reseed_crng() {
                        log!("{e}");
                    }
                    match rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts) {
                        Ok(()) => GuestMessage::Done { id },
                        Err(e) => GuestMessage::Error {
                            id,
                            kind: ErrorKind::from_io(e.kind()),
                            message: format!("setting the clock to {unix_nanos} ns: {e}"),
                        },
                    }
                } else {
                    GuestMessage::Error {
                        id,
                        kind: ErrorKind::Unsupported,
                        message: "set_time is disabled outside a VM".into(),
                    }
                };
                self.send(reply).await;
            }
            HostMessage::Restored { id, restored } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let result = agent.restore(restored).await;
                    agent.reply_done(id, result).await;
                });
            }
            HostMessage::DevStart { id, spec } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let result = agent.dev.start(spec).await;
                    agent.reply_done(id, result).await;
                });
            }
            HostMessage::DevStop { id, name } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let result = agent.dev.stop(&name).await;
                    agent.reply_done(id, result).await;
                });
            }
            HostMessage::DevList { id } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let items = agent.dev.list().await;
                    agent.send(GuestMessage::DevList { id, items }).await;
                });
            }
            HostMessage::DevLogs {
                id,
                name,
                follow,
                tail_bytes,
            } => devlog::start(self.clone(), id, name, follow, tail_bytes),
            HostMessage::StreamOpen {
                id,
                ip,
                port,
                connect_timeout_ms,
            } => tcp::start(self.clone(), id, ip, port, connect_timeout_ms),
            HostMessage::StreamData { id, data } => tcp::data(self, id, TcpMsg::Data(data)).await,
            HostMessage::StreamEof { id } => tcp::data(self, id, TcpMsg::Eof).await,
            HostMessage::NetConfig { id, cfg } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let result = net::configure(&cfg, &agent.paths, agent.in_vm).await;
                    agent.reply_done(id, result).await;
                });
            }
        }
    }

    /// The steps after a snapshot restore ([`HostMessage::Restored`]), in order; the
    /// first that fails ends it and names itself.
    async fn restore(&self, r: atelier_agent_proto::Restored) -> Result<(), (ErrorKind, String)> {
        if !self.in_vm {
            return Err((
                ErrorKind::Unsupported,
                "restored is disabled outside a VM".into(),
            ));
        }
        // A clone must not share random streams with its siblings: reseed first.
        if let Err(e) = sys::reseed_crng() {
            log!("{e}");
        }
        let ts = rustix::time::Timespec {
            tv_sec: (r.unix_nanos / 1_000_000_000) as i64,
            tv_nsec: (r.unix_nanos % 1_000_000_000) as _,
        };
        rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts).map_err(|e| {
            (
                ErrorKind::from_io(e.kind()),
                format!("setting the clock to {} ns: {e}", r.unix_nanos),
            )
        })?;
        if let Some(id) = &r.machine_id {
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    ErrorKind::Invalid,
                    format!("machine-id {id:?}: want 32 hex digits"),
                ));
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::write("/etc/machine-id", format!("{id}\n"))
                .and_then(|()| {
                    std::fs::set_permissions(
                        "/etc/machine-id",
                        std::fs::Permissions::from_mode(0o444),
                    )
                })
                .map_err(|e| (ErrorKind::Io, format!("writing /etc/machine-id: {e}")))?;
        }
        match (&r.hostname, &r.net) {
            (Some(h), Some(n)) if n.hostname.as_deref() == Some(h.as_str()) => {}
            (Some(h), _) => net::set_hostname(h)?,
            (None, _) => {}
        }
        if let Some(cfg) = &r.net {
            net::configure(cfg, &self.paths, self.in_vm).await?;
        }
        Ok(())
    }

    /// Answers `Done`, or the error.
    async fn reply_done(&self, id: u64, result: Result<(), (ErrorKind, String)>) {
        match result {
            Ok(()) => self.send(GuestMessage::Done { id }).await,
            Err((kind, message)) => self.send_error(id, kind, message).await,
        }
    }

    fn to_writer(&self, id: u64, msg: WriteMsg) {
        if let Some(Stream::Write(tx)) = self.streams().get(&id) {
            let _ = tx.send(msg);
        }
    }

    async fn shutdown(&self, id: u64, reboot: bool) {
        log!("shutdown requested (reboot: {reboot})");
        if self.in_vm {
            rustix::fs::sync();
        }
        self.send(GuestMessage::Done { id }).await;
        // Give the writer thread a moment to deliver the acknowledgement.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if self.in_vm {
            let failure = sys::power_off(reboot);
            log!("{failure}");
        } else {
            log!("not in a VM: exiting instead of powering off");
            self.dev.kill_all();
            std::process::exit(0);
        }
    }
}

/// Serves the control channel until the transport ends.
pub fn run(endpoint: Endpoint) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("creating the runtime: {e}"))?;
    let transport = crate::transport::open(endpoint)?;
    rt.block_on(serve(transport));
    Ok(())
}

async fn serve(transport: Transport) {
    let Transport {
        mut incoming,
        outgoing,
        in_vm,
    } = transport;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: sys::boot_id(),
        pid: std::process::id(),
    };
    let paths = Paths::from_env();
    let agent = Arc::new(Agent {
        out: outgoing,
        streams: Mutex::default(),
        hello,
        in_vm,
        dev: dev::Supervisor::new(paths.clone()),
        dev_resend: Notify::new(),
        paths,
    });
    tokio::spawn(Arc::clone(&agent).push_dev_changes());
    // Flush a frame a previous agent may have torn, then announce ourselves.
    let _ = agent.out.send(vec![0; SYNC_PREAMBLE_LEN]).await;
    agent.send_hello().await;
    log!("ready");
    let mut decoder = FrameDecoder::new();
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Data(data) => decoder.push(&data),
            Incoming::HostGone => {
                decoder.reset();
                continue;
            }
            Incoming::Eof => break,
        }
        while let Some(frame) = decoder.next_frame::<HostMessage>() {
            match frame {
                Ok(msg) => agent.handle(msg).await,
                Err(e) => {
                    log!("rejected a frame from the host: {e}");
                    agent
                        .send_error(
                            NO_REQUEST,
                            ErrorKind::Invalid,
                            format!("rejected frame: {e}"),
                        )
                        .await;
                }
            }
        }
    }
    log!("host connection ended");
    // Dev commands end with the worker (see `dev`): do not leave them behind.
    agent.dev.kill_all();
}
