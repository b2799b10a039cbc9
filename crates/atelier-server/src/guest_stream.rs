//! Byte streams from the manager to TCP ports inside running sandboxes, relayed by
//! the guest agent over its control channel: they need no guest network, so they
//! work with egress `deny-all` and with `--no-network`. Also the check that a
//! sandbox's agent speaks a protocol this manager serves, with errors naming what to
//! rebuild.

use std::time::Duration;

use atelier_agent_proto::{GuestStream, ProtoError};
use atelier_core::ErrorKind;

use crate::Error;
use crate::manager::Manager;

/// How long opening a stream may take (the agent's connect inside the guest included).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

impl Manager {
    /// Opens a byte stream to `127.0.0.1:port` inside running sandbox `id_or_name`.
    /// The returned stream is tokio `AsyncRead + AsyncWrite` (hyper or
    /// `copy_bidirectional` use it directly); dropping it closes the connection in
    /// the guest.
    pub async fn guest_stream(&self, id_or_name: &str, port: u16) -> Result<GuestStream, Error> {
        if port == 0 {
            return Err(Error::invalid(
                "port 0 is not a port to connect to; pass 1-65535",
            ));
        }
        let (rec, agent) = self.agent(id_or_name).await?;
        agent
            .open_stream(port, OPEN_TIMEOUT)
            .await
            .map_err(|e| stream_error(&rec.name, port, e))
    }
}

/// The manager error for a failed [`Manager::guest_stream`].
fn stream_error(sandbox: &str, port: u16, e: ProtoError) -> Error {
    match e {
        ProtoError::ConnectionRefused { .. } => Error::new(
            ErrorKind::Unavailable,
            format!(
                "nothing listens on port {port} in sandbox {sandbox}; start the service there first (e.g. `atelier dev start`)"
            ),
        ),
        ProtoError::Unsupported { agent_version, .. } => Error::conflict(format!(
            "the agent in sandbox {sandbox} is too old for streams to guest ports (protocol version {agent_version}): it comes from an image, template or prebuild made by an older atelier; rebuild that (`atelier image build <image> --force`, or `atelier prebuild create <workspace>`) and recreate the sandbox"
        )),
        ProtoError::Timeout { after, .. } => Error::unavailable(format!(
            "opening a stream to port {port} in sandbox {sandbox} took longer than {} s; is the service there stuck?",
            after.as_secs()
        )),
        ProtoError::Agent { kind, message, .. } => {
            let kind = match kind {
                atelier_agent_proto::ErrorKind::TimedOut => ErrorKind::Unavailable,
                atelier_agent_proto::ErrorKind::Invalid => ErrorKind::Invalid,
                _ => ErrorKind::Internal,
            };
            Error::new(
                kind,
                format!("opening a stream to port {port} in sandbox {sandbox}: {message}"),
            )
        }
        other => Manager::agent_error(other),
    }
}

/// What the agent of a VM came from, so an agent speaking an unsupported protocol
/// version can be reported with the command that fixes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AgentSource<'a> {
    /// Booted from image `name`.
    Image(&'a str),
    /// Restored or booted from the prebuild of workspace `name`.
    Prebuild(&'a str),
    /// Restored from the sandbox's own saved state (fork or resume).
    SavedState,
}

/// The manager error when `e` (from `wait_ready`) says the agent of `sandbox` speaks
/// a protocol version this manager does not serve; `None` for any other failure.
pub(crate) fn protocol_mismatch(
    e: &ProtoError,
    sandbox: &str,
    source: AgentSource<'_>,
) -> Option<Error> {
    let fix = match source {
        AgentSource::Image(image) => format!(
            "rebuild the image with `atelier image build {image} --force` (its memory template is rebuilt from it automatically) and create the sandbox again"
        ),
        AgentSource::Prebuild(workspace) => {
            format!("rebuild the prebuild with `atelier prebuild create {workspace}`")
        }
        AgentSource::SavedState => {
            "its saved state predates this manager: create the sandbox again".to_owned()
        }
    };
    match e {
        ProtoError::AgentTooOld { agent, min } => Some(Error::conflict(format!(
            "the agent in sandbox {sandbox} speaks protocol version {agent}, older than the oldest this manager serves ({min}); {fix}"
        ))),
        ProtoError::IncompatibleVersion { agent, host } => Some(Error::conflict(format!(
            "the agent in sandbox {sandbox} speaks protocol version {agent}, newer than this manager's ({host}); upgrade atelier on this host"
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_sandbox_the_port_and_the_fix() {
        let refused = stream_error(
            "web",
            4096,
            ProtoError::ConnectionRefused {
                addr: "127.0.0.1:4096".parse().expect("addr"),
                message: "refused".into(),
            },
        );
        assert_eq!(refused.kind, ErrorKind::Unavailable);
        assert!(
            refused
                .message
                .contains("nothing listens on port 4096 in sandbox web"),
            "{}",
            refused.message
        );
        let old = stream_error(
            "web",
            1,
            ProtoError::Unsupported {
                op: "open_stream",
                capability: atelier_agent_proto::CAP_TCP_STREAM,
                agent_version: 1,
            },
        );
        assert_eq!(old.kind, ErrorKind::Conflict);
        assert!(old.message.contains("rebuild"), "{}", old.message);

        let too_old = ProtoError::AgentTooOld { agent: 0, min: 1 };
        let e = protocol_mismatch(&too_old, "w1", AgentSource::Prebuild("shop")).expect("mismatch");
        assert!(
            e.message.contains("`atelier prebuild create shop`"),
            "{}",
            e.message
        );
        let e = protocol_mismatch(&too_old, "w1", AgentSource::Image("minimal")).expect("mismatch");
        assert!(
            e.message.contains("`atelier image build minimal --force`"),
            "{}",
            e.message
        );
        let newer = ProtoError::IncompatibleVersion { agent: 9, host: 2 };
        let e = protocol_mismatch(&newer, "w1", AgentSource::SavedState).expect("mismatch");
        assert!(e.message.contains("upgrade atelier"), "{}", e.message);
        let other = ProtoError::Disconnected { reason: "x".into() };
        assert!(protocol_mismatch(&other, "w1", AgentSource::SavedState).is_none());
    }
}
