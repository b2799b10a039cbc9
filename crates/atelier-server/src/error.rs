use std::sync::Arc;

use atelier_core::{ErrorKind, ValidationError};
use atelier_store::StoreError;

/// A manager error: a kind (mapped to HTTP status and exit code), a message that
/// says what failed and what to do, and what only the log may see: a detail (host
/// paths, QEMU's stderr, guest output) and the error it came from.
///
/// `message` is what clients get (for internal errors not even that); `Display`
/// adds the detail and every cause, for the log.
#[derive(Debug, Clone)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// The message, safe to show to whoever made the request.
    pub message: String,
    /// For the log only.
    pub detail: Option<String>,
    /// The input field that was wrong (`repos[1].path`), for invalid input.
    pub field: Option<String>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = self.message.clone();
        if let Some(d) = &self.detail {
            out.push_str(&format!(" ({d})"));
        }
        // Causes whose text is already there (thiserror messages often embed
        // their source) are not repeated.
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            let text = e.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cur = e.source();
        }
        f.write_str(&out)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            detail: None,
            field: None,
            source: None,
        }
    }
    /// Invalid input.
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, m)
    }
    /// Not found.
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    /// Wrong state.
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, m)
    }
    /// A dependency is not answering.
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, m)
    }
    /// Unexpected failure.
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
    /// Adds what only the log may see (paths, stderr, guest output).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    /// Keeps the error this one came from (its chain goes to the log).
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(e));
        self
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        let mut err = Error::invalid(e.to_string());
        err.field = Some(e.field.into_owned());
        err
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::NameTaken(_)
            | StoreError::BadTransition { .. }
            | StoreError::PrebuildTransition { .. }
            | StoreError::TaskTransition { .. }
            | StoreError::AttentionResolved { .. } => ErrorKind::Conflict,
            StoreError::SandboxNotFound(_)
            | StoreError::TaskNotFound(_)
            | StoreError::AttentionNotFound(_) => ErrorKind::NotFound,
            StoreError::PoolExhausted => ErrorKind::ResourceExhausted,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

impl From<atelier_storage::StorageError> for Error {
    fn from(e: atelier_storage::StorageError) -> Self {
        match &e {
            atelier_storage::StorageError::NoSpace { .. } => Error::new(
                ErrorKind::ResourceExhausted,
                "the storage pool is out of space; delete sandboxes or prebuilds, or give the data dir more room",
            )
            .with_detail(e.to_string())
            .with_source(e),
            _ => Error::internal(e.to_string()).with_source(e),
        }
    }
}

impl From<atelier_vmm::VmmError> for Error {
    fn from(e: atelier_vmm::VmmError) -> Self {
        match &e {
            atelier_vmm::VmmError::BinaryMissing { .. } => Error::unavailable(
                "QEMU is not installed where the manager looks for it; run `atelier doctor`",
            )
            .with_detail(e.to_string())
            .with_source(e),
            atelier_vmm::VmmError::EarlyExit { .. } => {
                Error::unavailable("the VM process exited while starting; see the manager log")
                    .with_detail(e.to_string())
                    .with_source(e)
            }
            // What timed out is worth showing; the run dir in it is scrubbed from
            // response bodies (the log keeps it).
            atelier_vmm::VmmError::Timeout(..) | atelier_vmm::VmmError::QmpClosed { .. } => {
                Error::unavailable(e.to_string()).with_source(e)
            }
            atelier_vmm::VmmError::Invalid(m) => Error::invalid(m.clone()).with_source(e),
            _ => Error::internal(e.to_string()).with_source(e),
        }
    }
}
