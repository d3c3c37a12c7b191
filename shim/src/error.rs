//! The shim's error type: every failed Task call becomes one of these, and
//! each kind maps to the ttrpc status code containerd sees (the agent's
//! `error.rs` does the same on the guest side). Typed causes (a bad
//! config, a bundle that cannot be shared, a VM that would not boot) keep
//! their messages; the agent's own codes pass through, so a NOT_FOUND in
//! the guest stays "not found" for containerd.

use ttrpc::Code;

use crate::bundle::BundleError;
use crate::config::ConfigError;
use crate::pod::PodError;
use crate::stdio::StdioError;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No such container or exec in this shim.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Valid, but not in this state (start twice, delete a running one).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("starting the VM: {0}")]
    Boot(#[from] PodError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// An agent call failed: its status, or the VM is unreachable.
    #[error("{call}: {}", agent_message(.source))]
    Agent {
        call: &'static str,
        source: ttrpc::Error,
    },
    #[error("{0}")]
    Internal(String),
}

fn agent_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
        other => format!("the VM is not reachable: {other}"),
    }
}

impl ShimError {
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::InvalidArgument(_) | ShimError::Config(_) => Code::INVALID_ARGUMENT,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Agent {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => s.code(),
            ShimError::Agent { .. } => Code::UNAVAILABLE,
            ShimError::Bundle(_)
            | ShimError::Boot(_)
            | ShimError::Stdio(_)
            | ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

pub type Result<T, E = ShimError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: ShimError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_kind_has_its_code_and_the_agents_codes_pass_through() {
        assert_eq!(
            status_of(ShimError::NotFound("container x not found".into())),
            (Code::NOT_FOUND, "container x not found".into())
        );
        let guest = ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "no process 7"));
        assert_eq!(
            status_of(ShimError::Agent {
                call: "SignalProcess",
                source: guest
            }),
            (Code::NOT_FOUND, "SignalProcess: no process 7".into())
        );
        let (code, msg) = status_of(ShimError::Agent {
            call: "StartContainer",
            source: ttrpc::Error::LocalClosed,
        });
        assert_eq!(code, Code::UNAVAILABLE);
        assert!(
            msg.starts_with("StartContainer: the VM is not reachable"),
            "{msg}"
        );
        let (code, _) = status_of(ShimError::Config(ConfigError::Annotation {
            key: "podvisor.io/vcpus".into(),
            reason: "not a number".into(),
        }));
        assert_eq!(code, Code::INVALID_ARGUMENT);
    }
}
