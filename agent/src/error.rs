//! The agent's error type: every failed request becomes one of these, and
//! each kind maps to the ttrpc status code the shim sees.

use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is wrong (malformed spec, bad id, bad value).
    #[error("{0}")]
    InvalidArgument(String),
    /// It names a container or process the agent does not have.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Valid, but not now (exec into a stopped container, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The guest failed to do it (a syscall, a missing file in the rootfs).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Shorthands: `invalid!("bad id {id:?}")` and so on.
macro_rules! invalid {
    ($($t:tt)*) => { $crate::error::AgentError::InvalidArgument(format!($($t)*)) };
}
macro_rules! not_found {
    ($($t:tt)*) => { $crate::error::AgentError::NotFound(format!($($t)*)) };
}
macro_rules! precondition {
    ($($t:tt)*) => { $crate::error::AgentError::FailedPrecondition(format!($($t)*)) };
}
macro_rules! internal {
    ($($t:tt)*) => { $crate::error::AgentError::Internal(format!($($t)*)) };
}
pub(crate) use {internal, invalid, not_found, precondition};
