//! The one table from domain errors to status codes.

use tonic::{Code, Status};

use crate::domain::Error;

/// The status code of each domain error. Every protocol adapter uses this
/// table, so they cannot disagree.
pub fn code(err: &Error) -> Code {
    match err {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::ActionNotFound(_) | Error::ParentNotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        // The Flyte SDK reads ABORTED on Enqueue as "run was aborted".
        Error::ParentTerminal { .. } => Code::Aborted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        // Internal errors carry a generic message; their causes were
        // logged where they happened.
        Status::new(code(&err), err.to_string())
    }
}
