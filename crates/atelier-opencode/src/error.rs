//! The client's one error type.

use std::io;

/// What went wrong talking to OpenCode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connector could not open a byte stream to OpenCode's port (nothing listens,
    /// the guest stream was refused, ...).
    #[error("cannot open a connection to opencode: {0}; check that `opencode serve` runs")]
    Connect(#[source] io::Error),
    /// The call (or the event stream's idle deadline) passed before OpenCode answered;
    /// names the call.
    #[error("opencode did not answer `{0}` before its deadline; it may be hung or overloaded")]
    Timeout(&'static str),
    /// OpenCode answered with an unexpected HTTP status (the body is truncated).
    #[error("opencode answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The start of the answer body (at most [`crate::MAX_ERROR_BODY`] bytes).
        body: String,
    },
    /// OpenCode answered 404: the session, permission or question does not exist (or
    /// was already answered). Says what was asked for and OpenCode's message.
    #[error("opencode has no {0}")]
    NotFound(String),
    /// OpenCode's answer was not the JSON this client expects (another OpenCode version?).
    #[error("cannot decode opencode's answer: {0}")]
    Decode(String),
    /// The byte stream broke mid-call, or the event stream ended, was malformed or sent
    /// an oversized event.
    #[error("opencode stream failed: {0}")]
    Stream(String),
}

impl Error {
    /// Whether this is OpenCode's "not found" (a typed [`Error::NotFound`], or a bare 404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_) | Error::Status { status: 404, .. })
    }
}
