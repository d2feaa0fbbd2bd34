use thiserror::Error;

use super::{ActionId, Phase};

/// Every way a request can fail, in domain terms. The RPC edge maps each
/// variant to exactly one status code (see `rpc::status`).
#[derive(Debug, Clone, Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending field.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },

    #[error("action {0} not found")]
    ActionNotFound(ActionId),

    #[error("run {0} not found")]
    RunNotFound(super::RunId),

    #[error("parent action {0} not found")]
    ParentNotFound(ActionId),

    #[error("{0}")]
    AlreadyExists(String),

    /// Enqueue under a parent that has already finished: the run (or that
    /// branch of it) was aborted or is over.
    #[error("run was aborted: parent action {parent} is {phase}")]
    ParentTerminal { parent: ActionId, phase: Phase },

    /// The action is not in a state that allows the change.
    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    ResourceExhausted(String),

    /// The store (or another dependency) cannot be reached; retrying later
    /// may succeed.
    #[error("{0}")]
    Unavailable(String),

    /// A concurrent change made the store give up (a deadlock or a
    /// serialization failure); nothing was written and retrying may
    /// succeed. Reported as UNAVAILABLE.
    #[error("conflicting concurrent change; retry")]
    Conflict,

    /// A bug or an unexpected store failure. The cause is logged where it
    /// happens; clients only see a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}
