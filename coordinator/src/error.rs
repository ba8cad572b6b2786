//! The coordinator's error type and its single mapping to gRPC statuses.

use crate::store::StoreError;

/// Why a coordinator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials, not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// A malformed or out-of-range request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("no {kind} named `{name}`")]
    NotFound {
        /// Kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The named thing exists already.
    #[error("a {kind} named `{name}` already exists")]
    AlreadyExists {
        /// Kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The request cannot be served in the current state (e.g. a placement is infeasible).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota is used up (a tenant's jobs running at once).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The data dir could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or corrupt state.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// A `NotFound` error.
    pub fn not_found(kind: &'static str, name: &str) -> Self {
        CoordinatorError::NotFound {
            kind,
            name: shown(name, 80),
        }
    }
}

/// `text` as it may appear in a message to a client: control characters escaped (no terminal
/// escape sequences), cut to `max` characters.
pub fn shown(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl From<CoordinatorError> for tonic::Status {
    fn from(err: CoordinatorError) -> Self {
        // Messages echo what clients sent; a status message travels in an HTTP/2 header,
        // percent-encoded (1,000 characters stay under 12 KiB).
        let message = shown(&err.to_string(), 1000);
        match err {
            CoordinatorError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            CoordinatorError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            CoordinatorError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::NotFound { .. } => tonic::Status::not_found(message),
            CoordinatorError::AlreadyExists { .. } => tonic::Status::already_exists(message),
            CoordinatorError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            CoordinatorError::ResourceExhausted(_) => tonic::Status::resource_exhausted(message),
            CoordinatorError::Io(_)
            | CoordinatorError::Store(_)
            | CoordinatorError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
