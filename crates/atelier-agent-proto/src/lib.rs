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
//! Flow control: every byte stream (exec output, exec stdin, file chunks, PTY output
//! and input, dev command logs) is credit-based with a window of [`STREAM_WINDOW`]
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
pub mod message;
pub mod net;

pub use client::{
    AgentClient, DEFAULT_TIMEOUT, DevLogStream, ExecHandle, ExecOutput, ExecStdin, PtyReader,
    PtySession, PtyWriter, ReadFileStream,
};
pub use dev::{DEV_NAME_MAX, DevSpec, DevState, DevStatus, RestartPolicy, valid_dev_name};
pub use error::{FrameError, ProtoError};
pub use frame::{FrameDecoder, FrameReader, encode_frame};
pub use message::{
    CpuTimes, DEFAULT_TERM, ErrorKind, ExecEvent, ExecRequest, GuestMessage, Hello, HostMessage,
    Metrics, PtyEvent, PtyRequest,
};
pub use net::NetConfig;

/// Version of the wire protocol; a [`Hello`] with another version is refused by the host.
pub const PROTOCOL_VERSION: u32 = 1;

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
