//! Error types of the protocol crate.

use std::path::PathBuf;
use std::time::Duration;

use crate::message::ErrorKind;

/// Why one frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame header announced a body larger than [`crate::MAX_FRAME_LEN`].
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid postcard encoding of the expected message type.
    #[error("malformed frame body ({len} bytes): {source}")]
    Body {
        /// Body length.
        len: usize,
        /// The postcard error.
        source: postcard::Error,
    },
    /// The body decoded but left bytes over.
    #[error("malformed frame body: {extra} trailing bytes after the message")]
    TrailingBytes {
        /// Number of unconsumed bytes.
        extra: usize,
    },
    /// Serialising a message failed.
    #[error("encoding a message failed: {0}")]
    Encode(postcard::Error),
}

/// Errors of the host-side client; each variant names the failed operation.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Connecting to the agent's unix socket failed.
    #[error("connecting to agent socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection to the agent is closed; every request fails with this afterwards.
    #[error("agent connection closed: {reason}")]
    Disconnected {
        /// What closed it.
        reason: String,
    },
    /// The agent restarted (a new Hello) while this request was outstanding.
    #[error("{op} failed: the agent restarted (new pid {pid}); the request was lost")]
    AgentRestarted {
        /// Operation that was outstanding.
        op: &'static str,
        /// Pid of the new agent.
        pid: u32,
    },
    /// The agent speaks a newer protocol version than this host.
    #[error(
        "agent protocol version {agent} is newer than this host's version {host}; upgrade atelier on the host"
    )]
    IncompatibleVersion {
        /// Version the agent announced.
        agent: u32,
        /// Our version.
        host: u32,
    },
    /// The agent's protocol version is older than the oldest this host serves: the
    /// image, template or prebuild the sandbox came from must be rebuilt.
    #[error(
        "agent protocol version {agent} is older than the oldest this host serves ({min}); rebuild the image, template or prebuild the sandbox was made from"
    )]
    AgentTooOld {
        /// Version the agent announced.
        agent: u32,
        /// Oldest version served ([`crate::MIN_AGENT_PROTOCOL_VERSION`]).
        min: u32,
    },
    /// The agent does not serve a capability the operation needs (an older agent,
    /// e.g. one frozen in a prebuild snapshot); nothing was sent to it.
    #[error(
        "{op} is not supported by the agent (protocol version {agent_version}, lacks capability {capability}); rebuild the image, template or prebuild the sandbox was made from"
    )]
    Unsupported {
        /// Operation.
        op: &'static str,
        /// The missing capability.
        capability: &'static str,
        /// The agent's protocol version.
        agent_version: u32,
    },
    /// Nothing listens at the address of a stream in the guest.
    #[error("nothing listens on {addr} in the guest: {message}")]
    ConnectionRefused {
        /// The address the agent tried.
        addr: std::net::SocketAddr,
        /// The agent's message.
        message: String,
    },
    /// The agent did not answer in time (a hung or overloaded guest).
    #[error(
        "{op} timed out after {after:?}: the agent did not answer; the guest may be hung or overloaded"
    )]
    Timeout {
        /// Operation.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The agent answered with a typed error.
    #[error("{op} failed in the agent ({kind:?}): {message}")]
    Agent {
        /// Operation.
        op: &'static str,
        /// Error class.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with a message that does not fit the request.
    #[error("{op}: unexpected reply from the agent: {got}")]
    UnexpectedReply {
        /// Operation.
        op: &'static str,
        /// Debug rendering of what arrived.
        got: String,
    },
    /// The agent sent more stream data than the flow-control window allows.
    #[error("{op}: agent exceeded the flow-control window for request {id}")]
    FlowControl {
        /// Operation.
        op: &'static str,
        /// Request id.
        id: u64,
    },
    /// A stream ended early or its data did not add up.
    #[error("{op}: stream for request {id} ended abnormally: {detail}")]
    StreamBroken {
        /// Operation.
        op: &'static str,
        /// Request id.
        id: u64,
        /// What went wrong.
        detail: String,
    },
    /// Reading the local source of a file upload failed.
    #[error("write_file {path}: reading the local source failed: {source}")]
    WriteFileSource {
        /// Destination path in the guest.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Encoding an outgoing message failed.
    #[error("encoding a request failed: {0}")]
    Encode(#[from] FrameError),
}
