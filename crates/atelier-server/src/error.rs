use atelier_core::{ErrorKind, ValidationError};
use atelier_store::StoreError;

/// A manager error: a kind (mapped to HTTP status and exit code) and a message that
/// says what failed and what to do. Internal errors keep their detail for the log;
/// the API sends a generic message for them.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// The message.
    pub message: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
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
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Error::invalid(e.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::NameTaken(_) | StoreError::BadTransition { .. } => ErrorKind::Conflict,
            StoreError::SandboxNotFound(_) => ErrorKind::NotFound,
            StoreError::PoolExhausted => ErrorKind::ResourceExhausted,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<atelier_storage::StorageError> for Error {
    fn from(e: atelier_storage::StorageError) -> Self {
        let kind = match &e {
            atelier_storage::StorageError::NoSpace { .. } => ErrorKind::ResourceExhausted,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<atelier_vmm::VmmError> for Error {
    fn from(e: atelier_vmm::VmmError) -> Self {
        let kind = match &e {
            atelier_vmm::VmmError::BinaryMissing { .. }
            | atelier_vmm::VmmError::EarlyExit { .. }
            | atelier_vmm::VmmError::Timeout(..)
            | atelier_vmm::VmmError::QmpClosed { .. } => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}
