//! The message schema. Variant order is part of the wire format (postcard encodes
//! enum variants by index): append new variants at the end and bump
//! [`crate::PROTOCOL_VERSION`] for incompatible changes. A new feature is announced
//! as a capability in [`GuestMessage::Capabilities`] (see [`crate::CAPABILITIES`]) and
//! the client checks it before sending the new messages, so agents frozen in older
//! snapshots never receive a variant they cannot decode. [`Hello`] must never change:
//! every agent ever built sends it. The snapshot test at the bottom freezes the
//! encoding of every message.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::dev::{DevSpec, DevStatus};
use crate::net::NetConfig;

/// Sent by the agent whenever it (re)starts, and in reply to [`HostMessage::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Pid of the serving agent process; a new pid means the agent restarted.
    pub pid: u32,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when `None`.
    pub cwd: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Keep stdin open for [`HostMessage::Stdin`] frames; otherwise stdin is `/dev/null`.
    pub stdin: bool,
}

impl ExecRequest {
    /// A request for `argv` with no extra env, default cwd, no timeout, no stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            timeout_ms: None,
            stdin: false,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Keeps stdin open for streaming.
    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }
}

/// The contents of [`HostMessage::Restored`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The clock, in nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
    /// A new `/etc/machine-id` (32 hex digits), for a clone; None keeps it.
    pub machine_id: Option<String>,
    /// A new hostname, for a clone; None keeps it (`net.hostname` also sets it).
    pub hostname: Option<String>,
    /// The network configuration, when the guest has a network.
    pub net: Option<crate::NetConfig>,
}

/// Class of an error reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A file, directory or executable does not exist.
    NotFound,
    /// The agent may not do it.
    PermissionDenied,
    /// The target already exists.
    AlreadyExists,
    /// The request is malformed or refers to an unknown id.
    Invalid,
    /// An I/O operation failed.
    Io,
    /// The agent does not support this (e.g. not running in a VM).
    Unsupported,
    /// A bug or unexpected condition in the agent.
    Internal,
    /// Nothing accepts connections at the address a `StreamOpen` named.
    ConnectionRefused,
    /// An operation in the guest did not complete in time (e.g. a stream's connect).
    TimedOut,
}

impl ErrorKind {
    /// Maps an I/O error kind to the closest protocol error kind.
    pub fn from_io(kind: std::io::ErrorKind) -> Self {
        match kind {
            std::io::ErrorKind::NotFound => Self::NotFound,
            std::io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            std::io::ErrorKind::AlreadyExists => Self::AlreadyExists,
            // What the caller asked for cannot be: a bad or too long path, a file
            // where a directory is needed (or the reverse), a read-only or full
            // target. The caller's to fix, not the agent's.
            std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::InvalidData
            | std::io::ErrorKind::InvalidFilename
            | std::io::ErrorKind::NotADirectory
            | std::io::ErrorKind::IsADirectory
            | std::io::ErrorKind::DirectoryNotEmpty
            | std::io::ErrorKind::ReadOnlyFilesystem
            | std::io::ErrorKind::FileTooLarge
            | std::io::ErrorKind::TooManyLinks
            | std::io::ErrorKind::CrossesDevices => Self::Invalid,
            std::io::ErrorKind::Unsupported => Self::Unsupported,
            std::io::ErrorKind::ConnectionRefused => Self::ConnectionRefused,
            std::io::ErrorKind::TimedOut => Self::TimedOut,
            _ => Self::Io,
        }
    }
}

/// One event of a running command, in order: `Started`, output, then `Exit` last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    /// The process was spawned (it leads its own process group).
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes from stdout, as they came (no line buffering).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes from stderr, as they came.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process exited; always the last event.
    Exit {
        /// Exit code when it exited normally.
        code: Option<i32>,
        /// Signal number when it was killed by a signal.
        signal: Option<i32>,
        /// Whether the agent killed it because of `timeout_ms`.
        timed_out: bool,
    },
}

/// Terminal type used when a [`PtyRequest`] names none.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// An interactive program to run on a pseudo-terminal in the guest.
///
/// The program leads a new session with the pty as its controlling terminal, so job
/// control, `SIGWINCH` on resize and Ctrl-C (byte `0x03`, turned into `SIGINT` by the
/// line discipline) behave as on a real terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// Program and arguments; empty runs the user's login shell (the shell from
    /// `/etc/passwd`, else `/bin/bash`, else `/bin/sh`, with `-l`).
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment (after `TERM` and `HOME`).
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home directory when `None`.
    pub cwd: Option<String>,
    /// Initial window height in character cells.
    pub rows: u16,
    /// Initial window width in character cells.
    pub cols: u16,
    /// `TERM` of the program; [`DEFAULT_TERM`] when empty.
    pub term: String,
}

impl PtyRequest {
    /// A login shell on a `rows` x `cols` terminal of type [`DEFAULT_TERM`].
    pub fn shell(rows: u16, cols: u16) -> Self {
        Self {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            rows,
            cols,
            term: DEFAULT_TERM.to_owned(),
        }
    }

    /// `argv` on a `rows` x `cols` terminal of type [`DEFAULT_TERM`].
    pub fn new<I, S>(argv: I, rows: u16, cols: u16) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::shell(rows, cols)
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the terminal type (`TERM`).
    pub fn term(mut self, term: impl Into<String>) -> Self {
        self.term = term.into();
        self
    }
}

/// One event of a PTY session, in order: `Started`, output, then `Exit` last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PtyEvent {
    /// The program was spawned; it leads its own session and process group.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes the terminal displayed (program output and echo), as they came.
    Output(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The program exited and its output was drained; always the last event.
    Exit {
        /// Exit code when it exited normally.
        code: Option<i32>,
        /// Signal number when it was killed by a signal.
        signal: Option<i32>,
    },
}

/// Cumulative CPU time of all CPUs from the first line of `/proc/stat`, in jiffies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTimes {
    /// Normal user time.
    pub user: u64,
    /// Niced user time.
    pub nice: u64,
    /// Kernel time.
    pub system: u64,
    /// Idle time.
    pub idle: u64,
    /// Waiting for I/O.
    pub iowait: u64,
    /// Servicing interrupts.
    pub irq: u64,
    /// Servicing softirqs.
    pub softirq: u64,
    /// Stolen by the hypervisor.
    pub steal: u64,
}

impl CpuTimes {
    /// Sum of all fields.
    pub fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    /// Busy fraction (0.0..=1.0 of all CPUs) between an earlier sample and this one.
    pub fn busy_fraction_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total().saturating_sub(earlier.total());
        if total == 0 {
            return 0.0;
        }
        let idle = (self.idle + self.iowait).saturating_sub(earlier.idle + earlier.iowait);
        1.0 - (idle.min(total) as f64 / total as f64)
    }
}

/// A health/metrics sample of the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Cumulative CPU times; diff two samples with [`CpuTimes::busy_fraction_since`].
    pub cpu: CpuTimes,
    /// Number of online CPUs.
    pub cpu_count: u32,
    /// `MemTotal` in bytes.
    pub mem_total_bytes: u64,
    /// `MemAvailable` in bytes.
    pub mem_available_bytes: u64,
    /// Size of the filesystem holding `/`, in bytes.
    pub disk_total_bytes: u64,
    /// Bytes available to unprivileged users on `/`.
    pub disk_free_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    /// Seconds since the guest booted.
    pub uptime_secs: f64,
}

/// Messages from the host (manager) to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Sent when the host connects; the agent answers with its [`Hello`].
    Hello {
        /// The host's protocol version.
        version: u32,
    },
    /// Liveness probe; answered by [`GuestMessage::Pong`].
    Ping {
        /// Request id.
        id: u64,
    },
    /// Runs a command; answered by [`GuestMessage::Exec`] events or an error.
    Exec {
        /// Request id.
        id: u64,
        /// What to run.
        req: ExecRequest,
    },
    /// Stdin bytes for the exec `id` (needs a credit, see [`crate::STREAM_WINDOW`]).
    Stdin {
        /// Exec request id.
        id: u64,
        /// Bytes to write.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Close stdin after writing `data`.
        eof: bool,
    },
    /// Sends a signal to the process group of exec or PTY session `id` (for a PTY:
    /// the group of the program started, not the terminal's foreground group).
    Kill {
        /// Exec or PTY request id.
        id: u64,
        /// Signal number.
        signal: i32,
    },
    /// The host gave up on request `id`: an exec is killed (SIGKILL to its group),
    /// a file transfer aborted, a PTY session hung up (SIGHUP to its process groups,
    /// then SIGKILL to every process left in its session).
    Cancel {
        /// Request id.
        id: u64,
    },
    /// The host consumed `bytes` of stream `id` (exec output, file chunks, PTY output);
    /// the agent may send that much more.
    Credit {
        /// Request id.
        id: u64,
        /// Bytes granted.
        bytes: u32,
    },
    /// Starts a file upload; followed by `WriteChunk`s and `WriteEnd`.
    WriteFile {
        /// Request id.
        id: u64,
        /// Absolute destination path; its parent directory must exist.
        path: String,
        /// Permission bits of the new file.
        mode: u32,
    },
    /// A piece of an upload (needs a credit).
    WriteChunk {
        /// Request id of the `WriteFile`.
        id: u64,
        /// File bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Ends an upload; the agent renames the temp file and answers `WriteDone`.
    WriteEnd {
        /// Request id of the `WriteFile`.
        id: u64,
    },
    /// Streams a file back as `FileChunk`s and `FileEnd`.
    ReadFile {
        /// Request id.
        id: u64,
        /// Absolute path.
        path: String,
    },
    /// Asks for a [`Metrics`] sample.
    Metrics {
        /// Request id.
        id: u64,
    },
    /// Syncs and powers off (or reboots) the guest; acknowledged with `Done` first.
    Shutdown {
        /// Request id.
        id: u64,
        /// Reboot instead of power off.
        reboot: bool,
    },
    /// Sets the guest's realtime clock (after a snapshot restore).
    SetTime {
        /// Request id.
        id: u64,
        /// Nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// Starts a program on a pseudo-terminal; answered by [`GuestMessage::Pty`] events
    /// or an error. Stopped with `Kill`, hung up with `Cancel`.
    Pty {
        /// Request id.
        id: u64,
        /// What to run, on which terminal.
        req: PtyRequest,
    },
    /// Keyboard input for PTY session `id`, written to the terminal's master side
    /// (needs a credit, like `Stdin`; the agent returns credit once written).
    PtyInput {
        /// PTY request id.
        id: u64,
        /// Bytes as typed (`0x03` is Ctrl-C, `0x04` Ctrl-D, ...).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Sets the window size of PTY session `id`; the kernel sends `SIGWINCH` to the
    /// terminal's foreground process group.
    PtyResize {
        /// PTY request id.
        id: u64,
        /// Height in character cells.
        rows: u16,
        /// Width in character cells.
        cols: u16,
    },
    /// Starts dev command `spec.name`, replacing (stopping first) one of that name;
    /// answered by `Done` once it is spawned, or `Error`.
    DevStart {
        /// Request id.
        id: u64,
        /// What to run.
        spec: DevSpec,
    },
    /// Stops dev command `name` (SIGTERM to its process group, SIGKILL after a grace
    /// period) without restarting it; answered by `Done`, or `Error` (`NotFound`).
    DevStop {
        /// Request id.
        id: u64,
        /// Dev command name.
        name: String,
    },
    /// Lists the dev commands; answered by [`GuestMessage::DevList`].
    DevList {
        /// Request id.
        id: u64,
    },
    /// Streams the log of dev command `name` as [`GuestMessage::DevLog`] chunks (each
    /// needs a credit). Without `follow` it ends with `Done`; with it, new output keeps
    /// coming until the host sends `Cancel` (no reply) or the command is replaced by a
    /// `DevStart` (then `Done`).
    DevLogs {
        /// Request id.
        id: u64,
        /// Dev command name.
        name: String,
        /// Keep streaming new output.
        follow: bool,
        /// Start this many bytes before the end of the log (across rotated files);
        /// `u64::MAX` for all of it, 0 for only new output.
        tail_bytes: u64,
    },
    /// Configures the guest's network interface (idempotent; replaces any earlier
    /// configuration); answered by `Done` or `Error`.
    NetConfig {
        /// Request id.
        id: u64,
        /// The configuration.
        cfg: NetConfig,
    },
    /// Opens a TCP connection from the agent to `ip:port` in the guest (capability
    /// [`crate::CAP_TCP_STREAM`]); answered by [`GuestMessage::StreamOpened`], or by
    /// `Error` (`ConnectionRefused` when nothing listens, `TimedOut` after
    /// `connect_timeout_ms`). Data then flows both ways as `StreamData`, each direction
    /// under its own credit window; `Cancel` closes the connection.
    StreamOpen {
        /// Request id (the stream's id from now on).
        id: u64,
        /// Address in the guest, usually `127.0.0.1`.
        ip: IpAddr,
        /// TCP port.
        port: u16,
        /// The agent gives up connecting after this many milliseconds.
        connect_timeout_ms: u32,
    },
    /// Bytes for stream `id`, written to the guest socket in order (needs a credit;
    /// the agent returns [`GuestMessage::Credit`] once they are written).
    StreamData {
        /// Stream id.
        id: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The host sends no more data on stream `id`: the agent shuts down the write
    /// side of the guest socket after the data before it (half-close).
    StreamEof {
        /// Stream id.
        id: u64,
    },
    // New messages go last: postcard encodes the variant index, and agents frozen
    // in older snapshots must still decode the ones before.
    /// Everything a guest needs right after its memory was restored, in one request
    /// (capability [`crate::CAP_RESTORED`]): reseed the CRNG and set the clock, then
    /// the new identity (machine-id, hostname) when it is a clone, then the network
    /// configuration when it has one. Answered by `Done`, or `Error` naming the step.
    Restored {
        /// Request id.
        id: u64,
        /// What to set.
        restored: Restored,
    },
}

/// Messages from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// The agent (re)started or the host said hello.
    Hello(Hello),
    /// Answer to `Ping`.
    Pong {
        /// Request id.
        id: u64,
    },
    /// An event of exec `id`.
    Exec {
        /// Request id.
        id: u64,
        /// The event.
        event: ExecEvent,
    },
    /// The agent consumed `bytes` of host-sent stream data (stdin, upload chunks, PTY
    /// input).
    Credit {
        /// Request id.
        id: u64,
        /// Bytes granted.
        bytes: u32,
    },
    /// A piece of a file being read (needs a credit).
    FileChunk {
        /// Request id.
        id: u64,
        /// File bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of a file read.
    FileEnd {
        /// Request id.
        id: u64,
        /// Total bytes sent.
        size: u64,
    },
    /// An upload was stored.
    WriteDone {
        /// Request id.
        id: u64,
        /// Bytes written.
        size: u64,
    },
    /// Answer to `Metrics`.
    Metrics {
        /// Request id.
        id: u64,
        /// The sample.
        metrics: Metrics,
    },
    /// Generic acknowledgement (`Shutdown`, `SetTime`, `DevStart`, `DevStop`, `NetConfig`,
    /// the end of `DevLogs`).
    Done {
        /// Request id.
        id: u64,
    },
    /// Request `id` failed; terminal for that request. `id` 0: no request.
    Error {
        /// Request id.
        id: u64,
        /// Error class.
        kind: ErrorKind,
        /// What failed, with which input.
        message: String,
    },
    /// An event of PTY session `id` (`Output` needs a credit).
    Pty {
        /// Request id.
        id: u64,
        /// The event.
        event: PtyEvent,
    },
    /// Answer to `DevList`: every dev command the agent knows, sorted by name.
    DevList {
        /// Request id.
        id: u64,
        /// Their status.
        items: Vec<DevStatus>,
    },
    /// A piece of a dev command's log (needs a credit).
    DevLog {
        /// Request id of the `DevLogs`.
        id: u64,
        /// Log bytes, as the command wrote them.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The optional features this agent serves ([`crate::CAP_TCP_STREAM`], ...). Agents
    /// of protocol version 2 and later send it right after every [`Hello`]; an agent
    /// of version 1 never does and serves none of them.
    Capabilities {
        /// Capability names.
        caps: Vec<String>,
    },
    /// Stream `id` is connected; data may flow.
    StreamOpened {
        /// Stream id.
        id: u64,
    },
    /// Bytes the guest socket of stream `id` delivered (needs a credit: the agent
    /// never reads more from the socket than the host granted).
    StreamData {
        /// Stream id.
        id: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The guest socket of stream `id` reached end of file (the service closed or
    /// half-closed it); data from the host may still flow the other way.
    StreamEof {
        /// Stream id.
        id: u64,
    },
    /// Sent unasked (capability [`crate::CAP_DEV_EVENTS`]) whenever a dev command
    /// starts, stops, exits or starts or stops listening on its port, and right
    /// after every Hello: the statuses of all dev commands, as `DevList` answers.
    DevChanged {
        /// Every dev command's status (`uptime_secs` is as of sending).
        items: Vec<crate::DevStatus>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{DevState, RestartPolicy};

    fn host_samples() -> Vec<HostMessage> {
        vec![
            HostMessage::Hello { version: 1 },
            HostMessage::Ping { id: 1 },
            HostMessage::Exec {
                id: 2,
                req: ExecRequest::new(["sh", "-c", "echo hi"])
                    .env("A", "b")
                    .cwd("/tmp")
                    .timeout(std::time::Duration::from_millis(1500))
                    .with_stdin(),
            },
            HostMessage::Stdin {
                id: 2,
                data: b"in\n".to_vec(),
                eof: true,
            },
            HostMessage::Kill { id: 2, signal: 15 },
            HostMessage::Cancel { id: 2 },
            HostMessage::Credit {
                id: 2,
                bytes: 65536,
            },
            HostMessage::WriteFile {
                id: 3,
                path: "/tmp/f".into(),
                mode: 0o644,
            },
            HostMessage::WriteChunk {
                id: 3,
                data: vec![0, 1, 2, 255],
            },
            HostMessage::WriteEnd { id: 3 },
            HostMessage::ReadFile {
                id: 4,
                path: "/etc/hostname".into(),
            },
            HostMessage::Metrics { id: 5 },
            HostMessage::Shutdown {
                id: 6,
                reboot: true,
            },
            HostMessage::SetTime {
                id: 7,
                unix_nanos: 1_700_000_000_000_000_000,
            },
            HostMessage::Pty {
                id: 8,
                req: PtyRequest::new(["vim", "x"], 24, 80)
                    .env("A", "b")
                    .cwd("/root")
                    .term("xterm"),
            },
            HostMessage::Pty {
                id: 9,
                req: PtyRequest::shell(50, 200),
            },
            HostMessage::PtyInput {
                id: 8,
                data: vec![3, b'q', b'\r'],
            },
            HostMessage::PtyResize {
                id: 8,
                rows: 40,
                cols: 132,
            },
            HostMessage::DevStart {
                id: 10,
                spec: DevSpec::new("web", "npm run dev")
                    .cwd("/work")
                    .env("PORT", "3000")
                    .port(3000)
                    .restart(RestartPolicy::Always),
            },
            HostMessage::DevStart {
                id: 11,
                spec: DevSpec::new("w", "true").restart(RestartPolicy::Never),
            },
            HostMessage::DevStart {
                id: 12,
                spec: DevSpec::new("x", "y"),
            },
            HostMessage::DevStop {
                id: 13,
                name: "web".into(),
            },
            HostMessage::DevList { id: 14 },
            HostMessage::DevLogs {
                id: 15,
                name: "web".into(),
                follow: true,
                tail_bytes: 4096,
            },
            HostMessage::NetConfig {
                id: 16,
                cfg: NetConfig {
                    mac: [0x02, 0xa7, 0, 0, 0, 1],
                    address: [10, 0, 0, 2],
                    prefix_len: 24,
                    gateway: [10, 0, 0, 1],
                    dns: vec![[10, 0, 0, 1], [1, 1, 1, 1]],
                    hostname: Some("sbx".into()),
                },
            },
            HostMessage::StreamOpen {
                id: 17,
                ip: IpAddr::from([127, 0, 0, 1]),
                port: 4096,
                connect_timeout_ms: 10_000,
            },
            HostMessage::StreamOpen {
                id: 18,
                ip: IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                port: 22,
                connect_timeout_ms: 1,
            },
            HostMessage::StreamData {
                id: 17,
                data: b"GET /".to_vec(),
            },
            HostMessage::StreamEof { id: 17 },
            HostMessage::Restored {
                id: 19,
                restored: Restored {
                    unix_nanos: 1_700_000_000_000_000_000,
                    machine_id: Some("0123456789abcdef0123456789abcdef".into()),
                    hostname: Some("sbx".into()),
                    net: None,
                },
            },
        ]
    }

    fn guest_samples() -> Vec<GuestMessage> {
        vec![
            GuestMessage::Hello(Hello {
                version: 1,
                agent_version: "0.1.0".into(),
                boot_id: "b00t".into(),
                pid: 42,
            }),
            GuestMessage::Pong { id: 1 },
            GuestMessage::Exec {
                id: 2,
                event: ExecEvent::Started { pid: 100 },
            },
            GuestMessage::Exec {
                id: 2,
                event: ExecEvent::Stdout(b"out".to_vec()),
            },
            GuestMessage::Exec {
                id: 2,
                event: ExecEvent::Stderr(b"err".to_vec()),
            },
            GuestMessage::Exec {
                id: 2,
                event: ExecEvent::Exit {
                    code: Some(3),
                    signal: None,
                    timed_out: false,
                },
            },
            GuestMessage::Exec {
                id: 2,
                event: ExecEvent::Exit {
                    code: None,
                    signal: Some(9),
                    timed_out: true,
                },
            },
            GuestMessage::Credit { id: 2, bytes: 3 },
            GuestMessage::FileChunk {
                id: 4,
                data: b"host\n".to_vec(),
            },
            GuestMessage::FileEnd { id: 4, size: 5 },
            GuestMessage::WriteDone { id: 3, size: 4 },
            GuestMessage::Metrics {
                id: 5,
                metrics: Metrics {
                    cpu: CpuTimes {
                        user: 1,
                        nice: 2,
                        system: 3,
                        idle: 4,
                        iowait: 5,
                        irq: 6,
                        softirq: 7,
                        steal: 8,
                    },
                    cpu_count: 2,
                    mem_total_bytes: 1 << 30,
                    mem_available_bytes: 1 << 29,
                    disk_total_bytes: 10 << 30,
                    disk_free_bytes: 5 << 30,
                    load_avg: [0.5, 0.25, 0.125],
                    uptime_secs: 12.5,
                },
            },
            GuestMessage::Done { id: 6 },
            GuestMessage::Error {
                id: 7,
                kind: ErrorKind::NotFound,
                message: "no such file: /x".into(),
            },
            GuestMessage::Pty {
                id: 8,
                event: PtyEvent::Started { pid: 300 },
            },
            GuestMessage::Pty {
                id: 8,
                event: PtyEvent::Output(b"\x1b[H$ ".to_vec()),
            },
            GuestMessage::Pty {
                id: 8,
                event: PtyEvent::Exit {
                    code: Some(7),
                    signal: None,
                },
            },
            GuestMessage::Pty {
                id: 9,
                event: PtyEvent::Exit {
                    code: None,
                    signal: Some(1),
                },
            },
            GuestMessage::DevList {
                id: 14,
                items: vec![
                    DevStatus {
                        name: "web".into(),
                        command: "npm run dev".into(),
                        port: Some(3000),
                        state: DevState::Running,
                        pid: Some(500),
                        restarts: 2,
                        last_exit: Some(-9),
                        listening: true,
                        uptime_secs: 61,
                    },
                    DevStatus {
                        name: "a".into(),
                        command: "b".into(),
                        port: None,
                        state: DevState::Starting,
                        pid: None,
                        restarts: 0,
                        last_exit: None,
                        listening: false,
                        uptime_secs: 0,
                    },
                ],
            },
            GuestMessage::DevList {
                id: 14,
                items: [
                    DevState::Restarting,
                    DevState::Exited,
                    DevState::Stopped,
                    DevState::Failed,
                ]
                .into_iter()
                .map(|state| DevStatus {
                    name: "s".into(),
                    command: "c".into(),
                    port: None,
                    state,
                    pid: None,
                    restarts: 0,
                    last_exit: Some(1),
                    listening: false,
                    uptime_secs: 0,
                })
                .collect(),
            },
            GuestMessage::DevLog {
                id: 15,
                data: b"listening\n".to_vec(),
            },
            GuestMessage::Capabilities {
                caps: vec!["tcp-stream".into()],
            },
            GuestMessage::StreamOpened { id: 17 },
            GuestMessage::StreamData {
                id: 17,
                data: b"HTTP/1.1".to_vec(),
            },
            GuestMessage::StreamEof { id: 17 },
            GuestMessage::Error {
                id: 18,
                kind: ErrorKind::ConnectionRefused,
                message: "r".into(),
            },
            GuestMessage::Error {
                id: 18,
                kind: ErrorKind::TimedOut,
                message: "t".into(),
            },
            GuestMessage::DevChanged { items: Vec::new() },
        ]
    }

    /// Frozen encodings, one per sample, in order. A failure here means the wire
    /// format changed: if intended, review compatibility, bump PROTOCOL_VERSION when
    /// old peers would misread it, and update the strings. Existing strings must never
    /// change: agents frozen in snapshots keep sending (and expecting) them; the first
    /// guest string is the Hello every agent version sends.
    const HOST_SNAPSHOT: &[&str] = &[
        "0001",
        "0101",
        "020203027368022d63076563686f206869010141016201042f746d7001dc0b01",
        "030203696e0a01",
        "04021e",
        "0502",
        "0602808004",
        "0703062f746d702f66a403",
        "080304000102ff",
        "0903",
        "0a040d2f6574632f686f73746e616d65",
        "0b05",
        "0c0601",
        "0d078080a8b1e39fe7cb17",
        // PTY sessions (appended; earlier encodings unchanged).
        "0e08020376696d0178010141016201052f726f6f74185005787465726d",
        "0e0900000032c8010e787465726d2d323536636f6c6f72",
        "0f080303710d",
        "1008288401",
        // Dev commands and network configuration (appended; earlier encodings unchanged).
        "110a037765620b6e706d2072756e2064657601052f776f726b0104504f5254043330303001b81700",
        "110b0177047472756500000002",
        "110c0178017900000001",
        "120d03776562",
        "130e",
        "140f03776562018020",
        "151002a7000000010a000002180a000001020a000001010101010103736278",
        // TCP streams, protocol version 2 (appended; earlier encodings unchanged).
        "1611007f0000018020904e",
        "161201000000000000000000000000000000011601",
        "171105474554202f",
        "1811",
        // Restored (capability `restored`; appended).
        "19138080a8b1e39fe7cb1701203031323334353637383961626364656630313233343536373839616263646566010373627800",
    ];
    const GUEST_SNAPSHOT: &[&str] = &[
        "000105302e312e3004623030742a",
        "0101",
        "02020064",
        "020201036f7574",
        "02020203657272",
        "02020301060000",
        "02020300011201",
        "030203",
        "040405686f73740a",
        "050405",
        "060304",
        "07050102030405060708028080808004808080800280808080288080808014\
         000000000000e03f000000000000d03f000000000000c03f0000000000002940",
        "0806",
        "090700106e6f20737563682066696c653a202f78",
        // PTY sessions (appended; earlier encodings unchanged).
        "0a0800ac02",
        "0a0801051b5b482420",
        "0a0802010e00",
        "0a0902000102",
        // Dev commands (appended; earlier encodings unchanged).
        "0b0e02037765620b6e706d2072756e2064657601b8170101f403020111013d0161016200000000000000",
        "0b0e0401730163000200000102000001730163000300000102000001730163000400000102000001730163\
         0005000001020000",
        "0c0f0a6c697374656e696e670a",
        // Capabilities and TCP streams, protocol version 2 (appended; earlier
        // encodings, the version-1 Hello above included, unchanged).
        "0d010a7463702d73747265616d",
        "0e11",
        "0f1108485454502f312e31",
        "1011",
        "0912070172",
        "0912080174",
        // DevChanged (capability `dev-events`; appended).
        "1100",
    ];

    fn encode_all<T: Serialize>(msgs: &[T]) -> Vec<String> {
        msgs.iter()
            .map(|m| hex::encode(postcard::to_stdvec(m).expect("encode")))
            .collect()
    }

    #[test]
    fn schema_snapshot() {
        let host = encode_all(&host_samples());
        let guest = encode_all(&guest_samples());
        if std::env::var_os("ATELIER_PRINT_SNAPSHOT").is_some() {
            println!("HOST: {host:#?}\nGUEST: {guest:#?}");
        }
        assert_eq!(host, HOST_SNAPSHOT, "HostMessage encoding changed");
        assert_eq!(guest, GUEST_SNAPSHOT, "GuestMessage encoding changed");
    }

    #[test]
    fn every_sample_roundtrips() {
        for m in host_samples() {
            let bytes = postcard::to_stdvec(&m).expect("encode");
            assert_eq!(
                postcard::from_bytes::<HostMessage>(&bytes).expect("decode"),
                m
            );
        }
        for m in guest_samples() {
            let bytes = postcard::to_stdvec(&m).expect("encode");
            assert_eq!(
                postcard::from_bytes::<GuestMessage>(&bytes).expect("decode"),
                m
            );
        }
    }

    #[test]
    fn samples_cover_every_variant() {
        // Exhaustive matches: adding a variant without a sample fails to compile.
        let mut host_seen = [false; 26];
        for m in host_samples() {
            let i = match m {
                HostMessage::Hello { .. } => 0,
                HostMessage::Ping { .. } => 1,
                HostMessage::Exec { .. } => 2,
                HostMessage::Stdin { .. } => 3,
                HostMessage::Kill { .. } => 4,
                HostMessage::Cancel { .. } => 5,
                HostMessage::Credit { .. } => 6,
                HostMessage::WriteFile { .. } => 7,
                HostMessage::WriteChunk { .. } => 8,
                HostMessage::WriteEnd { .. } => 9,
                HostMessage::ReadFile { .. } => 10,
                HostMessage::Metrics { .. } => 11,
                HostMessage::Shutdown { .. } => 12,
                HostMessage::SetTime { .. } => 13,
                HostMessage::Pty { .. } => 14,
                HostMessage::PtyInput { .. } => 15,
                HostMessage::PtyResize { .. } => 16,
                HostMessage::DevStart { .. } => 17,
                HostMessage::DevStop { .. } => 18,
                HostMessage::DevList { .. } => 19,
                HostMessage::DevLogs { .. } => 20,
                HostMessage::NetConfig { .. } => 21,
                HostMessage::StreamOpen { .. } => 22,
                HostMessage::StreamData { .. } => 23,
                HostMessage::StreamEof { .. } => 24,
                HostMessage::Restored { .. } => 25,
            };
            host_seen[i] = true;
        }
        assert!(host_seen.iter().all(|s| *s));
        let mut guest_seen = [false; 28];
        for m in guest_samples() {
            let i = match m {
                GuestMessage::Hello(_) => 0,
                GuestMessage::Pong { .. } => 1,
                GuestMessage::Exec { event, .. } => match event {
                    ExecEvent::Started { .. } => 2,
                    ExecEvent::Stdout(_) => 3,
                    ExecEvent::Stderr(_) => 4,
                    ExecEvent::Exit { .. } => 5,
                },
                GuestMessage::Credit { .. } => 6,
                GuestMessage::FileChunk { .. } => 7,
                GuestMessage::FileEnd { .. } => 8,
                GuestMessage::WriteDone { .. } => 9,
                GuestMessage::Metrics { .. } => 10,
                GuestMessage::Done { .. } => 11,
                GuestMessage::Error { kind, .. } => match kind {
                    ErrorKind::NotFound
                    | ErrorKind::PermissionDenied
                    | ErrorKind::AlreadyExists
                    | ErrorKind::Invalid
                    | ErrorKind::Io
                    | ErrorKind::Unsupported
                    | ErrorKind::Internal
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut => 12,
                },
                GuestMessage::Pty { event, .. } => match event {
                    PtyEvent::Started { .. } => 13,
                    PtyEvent::Output(_) => 14,
                    PtyEvent::Exit { .. } => 15,
                },
                GuestMessage::DevList { items, .. } => {
                    for item in items {
                        let j = match item.state {
                            DevState::Starting => 16,
                            DevState::Running => 17,
                            DevState::Restarting => 18,
                            DevState::Exited => 19,
                            DevState::Stopped => 20,
                            DevState::Failed => 21,
                        };
                        guest_seen[j] = true;
                    }
                    continue;
                }
                GuestMessage::DevLog { .. } => 22,
                GuestMessage::Capabilities { .. } => 23,
                GuestMessage::StreamOpened { .. } => 24,
                GuestMessage::StreamData { .. } => 25,
                GuestMessage::StreamEof { .. } => 26,
                GuestMessage::DevChanged { .. } => 27,
            };
            guest_seen[i] = true;
        }
        assert!(guest_seen.iter().all(|s| *s));
    }

    #[test]
    fn io_errors_the_caller_caused_are_invalid() {
        use std::io::ErrorKind as Io;
        for k in [
            Io::InvalidFilename,
            Io::NotADirectory,
            Io::IsADirectory,
            Io::ReadOnlyFilesystem,
        ] {
            assert_eq!(ErrorKind::from_io(k), ErrorKind::Invalid, "{k:?}");
        }
        assert_eq!(ErrorKind::from_io(Io::NotFound), ErrorKind::NotFound);
        assert_eq!(ErrorKind::from_io(Io::Other), ErrorKind::Io);
    }

    #[test]
    fn error_kind_snapshot() {
        let kinds = [
            ErrorKind::NotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::AlreadyExists,
            ErrorKind::Invalid,
            ErrorKind::Io,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
            ErrorKind::ConnectionRefused,
            ErrorKind::TimedOut,
        ];
        let enc: Vec<u8> = kinds
            .iter()
            .flat_map(|k| postcard::to_stdvec(k).expect("encode"))
            .collect();
        assert_eq!(enc, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn busy_fraction() {
        let a = CpuTimes {
            user: 100,
            idle: 100,
            ..Default::default()
        };
        let b = CpuTimes {
            user: 150,
            idle: 150,
            ..Default::default()
        };
        assert!((b.busy_fraction_since(&a) - 0.5).abs() < 1e-9);
        assert_eq!(a.busy_fraction_since(&a), 0.0);
    }
}
