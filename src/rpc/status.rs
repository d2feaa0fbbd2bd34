//! The one table from domain errors to status codes.

use tonic::{Code, Status};

use crate::domain::Error;

/// The status code of each domain error. Every protocol adapter (gRPC,
/// gRPC-Web, Connect via [`connect_code`]) uses this table, so they cannot
/// disagree.
pub fn code(err: &Error) -> Code {
    match err {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::ActionNotFound(_) | Error::RunNotFound(_) | Error::ParentNotFound(_) => {
            Code::NotFound
        }
        Error::AlreadyExists(_) => Code::AlreadyExists,
        // The Flyte SDK reads ABORTED on Enqueue as "run was aborted".
        Error::ParentTerminal { .. } => Code::Aborted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unavailable(_) | Error::Conflict => Code::Unavailable,
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

/// The Connect protocol's name and HTTP status for each code.
pub fn connect_code(code: Code) -> (&'static str, http::StatusCode) {
    use http::StatusCode as H;
    match code {
        Code::Ok => ("ok", H::OK),
        Code::Cancelled => (
            "canceled",
            H::from_u16(499).expect("499 is a valid status code"),
        ),
        Code::Unknown => ("unknown", H::INTERNAL_SERVER_ERROR),
        Code::InvalidArgument => ("invalid_argument", H::BAD_REQUEST),
        Code::DeadlineExceeded => ("deadline_exceeded", H::GATEWAY_TIMEOUT),
        Code::NotFound => ("not_found", H::NOT_FOUND),
        Code::AlreadyExists => ("already_exists", H::CONFLICT),
        Code::PermissionDenied => ("permission_denied", H::FORBIDDEN),
        Code::ResourceExhausted => ("resource_exhausted", H::TOO_MANY_REQUESTS),
        Code::FailedPrecondition => ("failed_precondition", H::BAD_REQUEST),
        Code::Aborted => ("aborted", H::CONFLICT),
        Code::OutOfRange => ("out_of_range", H::BAD_REQUEST),
        Code::Unimplemented => ("unimplemented", H::NOT_IMPLEMENTED),
        Code::Internal => ("internal", H::INTERNAL_SERVER_ERROR),
        Code::Unavailable => ("unavailable", H::SERVICE_UNAVAILABLE),
        Code::DataLoss => ("data_loss", H::INTERNAL_SERVER_ERROR),
        Code::Unauthenticated => ("unauthenticated", H::UNAUTHORIZED),
    }
}
