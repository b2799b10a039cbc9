//! Host<->guest control-channel protocol of Atelier.
//!
//! The manager and the in-VM agent talk over one virtio-serial port (a byte stream;
//! a unix socket on the host). This crate holds everything both sides share:
//! - [`frame`]: length-framed encoding with a magic, defensive decoding and resync;
//! - [`message`]: the versioned message schema ([`HostMessage`], [`GuestMessage`]);
//! - [`client`]: the host-side async client ([`AgentClient`]) the manager uses.
//!
//! Interactive terminals: [`HostMessage::Pty`] runs a program on a pseudo-terminal in
//! the guest (its own session, the pty as controlling terminal); keyboard input goes in
//! as [`HostMessage::PtyInput`], window changes as [`HostMessage::PtyResize`], and the
//! terminal's output comes back as [`GuestMessage::Pty`] events ([`PtyEvent`]).
//! [`AgentClient::pty`] wraps this as a [`PtySession`] that splits into a
//! [`PtyReader`] and a cloneable [`PtyWriter`].
//!
//! Dev commands: [`HostMessage::DevStart`] / [`HostMessage::DevStop`] /
//! [`HostMessage::DevList`] / [`HostMessage::DevLogs`] manage long-running commands the
//! agent supervises ([`DevSpec`], [`DevStatus`]); [`AgentClient::dev_start`] and friends
//! wrap them. Network: [`HostMessage::NetConfig`] ([`NetConfig`]) sets the guest's MAC,
//! IPv4 address, default route and name servers, after every boot and restore.
//!
//! TCP streams: [`HostMessage::StreamOpen`] has the agent connect to a TCP port inside
//! the guest (`127.0.0.1:<port>` or another guest address) and relays bytes both ways
//! over the control channel ([`HostMessage::StreamData`] / [`GuestMessage::StreamData`],
//! half-close with `StreamEof`, close with `Cancel`). It needs no guest network card,
//! so it works with egress `deny-all` and with no network at all.
//! [`AgentClient::open_stream`] wraps it as a [`GuestStream`], a tokio `AsyncRead +
//! AsyncWrite` that hyper or `copy_bidirectional` use directly.
//!
//! Versioning: the agent sends a [`Hello`] with its [`PROTOCOL_VERSION`] whenever it
//! starts and when the host says hello. The version changes only when old peers would
//! misread the wire format; new features are appended message variants announced as
//! capabilities. An agent of version 2 or later sends [`GuestMessage::Capabilities`]
//! right after every Hello; a version-1 agent (frozen in an old snapshot) sends none
//! and is served its version-1 message set: a request needing a capability it lacks
//! fails with [`ProtoError::Unsupported`] before anything is sent. An agent below
//! [`MIN_AGENT_PROTOCOL_VERSION`] is refused with [`ProtoError::AgentTooOld`] (its
//! image, template or prebuild must be rebuilt); one above [`PROTOCOL_VERSION`] with
//! [`ProtoError::IncompatibleVersion`] (the host must be upgraded). The `Hello`
//! struct's encoding never changes, so every agent's Hello stays decodable.
//!
//! Flow control: every byte stream (exec output, exec stdin, file chunks, PTY output
//! and input, dev command logs, TCP streams in both directions) is credit-based with a window of [`STREAM_WINDOW`]
//! bytes per request, so neither side buffers unboundedly and a slow consumer never
//! blocks other requests.
//!
//! This crate must not depend on any other Atelier crate: the guest agent links it
//! statically and it has to stay small.

#![warn(missing_docs)]

pub mod client;
pub mod dev;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod net;

pub use client::{
    AgentClient, CONTROL_QUEUE, DEFAULT_TIMEOUT, DevLogStream, EXEC_OUTPUT_MAX, ExecHandle,
    ExecOutput, ExecStdin, GuestStream, PtyReader, PtySession, PtyWriter, REPLY_QUEUE,
    ReadFileStream,
};
pub use dev::{
    DEV_NAME_MAX, DEV_NAME_PATTERN, DevSpec, DevState, DevStatus, RestartPolicy, valid_dev_name,
};
pub use error::{FrameError, ProtoError};
pub use frame::{FrameDecoder, FrameReader, encode_frame};
pub use message::{
    CpuTimes, DEFAULT_TERM, ErrorKind, ExecEvent, ExecRequest, GuestMessage, Hello, HostMessage,
    Metrics, PtyEvent, PtyRequest, Restored,
};
pub use net::NetConfig;

/// Version of the wire protocol this crate speaks. Version 2 added
/// [`GuestMessage::Capabilities`] after every Hello (and TCP streams as a capability).
pub const PROTOCOL_VERSION: u32 = 2;

/// Oldest agent protocol version the host still serves (with the message set of that
/// version); an older agent is refused with [`ProtoError::AgentTooOld`].
pub const MIN_AGENT_PROTOCOL_VERSION: u32 = 1;

/// Capability: TCP streams into the guest ([`HostMessage::StreamOpen`]).
pub const CAP_TCP_STREAM: &str = "tcp-stream";

/// Capability: the steps after a snapshot restore in one request
/// ([`HostMessage::Restored`]).
pub const CAP_RESTORED: &str = "restored";

/// Capability: the agent pushes its dev commands' statuses when they change
/// ([`GuestMessage::DevChanged`]), so the host need not poll.
pub const CAP_DEV_EVENTS: &str = "dev-events";

/// Every capability this crate's agent serves, in the order it announces them.
pub const CAPABILITIES: &[&str] = &[CAP_TCP_STREAM, CAP_RESTORED, CAP_DEV_EVENTS];

/// Largest data payload of one TCP stream frame.
pub const STREAM_CHUNK_LEN: usize = 64 * 1024;

/// Name of the virtio-serial port the agent listens on (`virtserialport,name=...`).
pub const PORT_NAME: &str = "org.atelier.agent.0";

/// Largest frame body either side accepts; larger lengths are rejected before allocating.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of the data chunks a file transfer is split into.
pub const FILE_CHUNK_LEN: usize = 256 * 1024;

/// Largest data payload of one exec output or stdin frame.
pub const EXEC_CHUNK_LEN: usize = 64 * 1024;

/// Flow-control window: unacknowledged payload bytes allowed in flight per stream.
pub const STREAM_WINDOW: u32 = 1 << 20;

/// Request id reserved for messages that belong to no request (e.g. an undecodable frame).
pub const NO_REQUEST: u64 = 0;
