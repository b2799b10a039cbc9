use serde::Serialize;

/// What kind of failure an error is; every layer maps its errors onto one of these,
/// and the API and CLI map a kind onto an HTTP status and an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The input was malformed or out of range.
    Invalid,
    /// No credentials, or wrong ones.
    Unauthorized,
    /// Credentials are fine but this request may not use them (a cross-site
    /// browser request, a missing CSRF token).
    Forbidden,
    /// The named resource does not exist.
    NotFound,
    /// The resource exists but is in a state that forbids the operation.
    Conflict,
    /// The host is out of something (disk, memory, slots).
    ResourceExhausted,
    /// A dependency (hypervisor, agent, storage) is not answering.
    Unavailable,
    /// A bug or an unexpected host failure.
    Internal,
}

impl ErrorKind {
    /// HTTP status code for this kind.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::ResourceExhausted => 507,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// Kind for an HTTP status, used by the CLI to turn responses back into kinds.
    pub fn from_http_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::Invalid,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            429 | 507 => ErrorKind::ResourceExhausted,
            502..=504 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    /// Process exit code the CLI uses for this kind (documented in docs/api.md).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid => 2,
            ErrorKind::Unauthorized | ErrorKind::Forbidden => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Conflict => 5,
            ErrorKind::ResourceExhausted => 6,
            ErrorKind::Unavailable => 7,
            ErrorKind::Internal => 1,
        }
    }

    /// Stable snake_case code used in API error bodies.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A field of user input that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    /// The field that was wrong, named as in the API; a path into a document such
    /// as `repos[1].path` for nested input.
    pub field: std::borrow::Cow<'static, str>,
    /// Why, including the accepted range or form.
    pub reason: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(
        field: impl Into<std::borrow::Cow<'static, str>>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
