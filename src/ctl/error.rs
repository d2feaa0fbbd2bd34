//! How actionsctl fails: one line naming the status code, and an exit code
//! scripts can rely on.

use std::fmt;

use tonic::Code;

/// The exit codes of actionsctl. Documented in `--help` (see
/// [`EXIT_CODES_HELP`]) and in the README.
pub mod exit {
    /// The command did what it was asked; `watch --exit-on-terminal`: the
    /// action SUCCEEDED (or was RECOVERED).
    pub const OK: u8 = 0;
    /// Any other error (INTERNAL, UNKNOWN, UNIMPLEMENTED, …).
    pub const OTHER: u8 = 1;
    /// Bad command line (clap's usage errors use 2 as well).
    pub const USAGE: u8 = 2;
    /// The input was rejected: INVALID_ARGUMENT from the daemon, or a file or
    /// value actionsctl could not use before sending anything.
    pub const INVALID: u8 = 3;
    /// NOT_FOUND.
    pub const NOT_FOUND: u8 = 4;
    /// A conflict with the action's state: ALREADY_EXISTS,
    /// FAILED_PRECONDITION or ABORTED.
    pub const CONFLICT: u8 = 5;
    /// The daemon cannot be reached or did not answer in time: UNAVAILABLE,
    /// DEADLINE_EXCEEDED, no connection, or `--timeout` / `--wait` expired.
    pub const UNAVAILABLE: u8 = 6;
    /// RESOURCE_EXHAUSTED (e.g. a request over the daemon's size limit).
    pub const EXHAUSTED: u8 = 7;
    /// `watch --exit-on-terminal`: the action FAILED.
    pub const FAILED: u8 = 10;
    /// `watch --exit-on-terminal`: the action was ABORTED.
    pub const ABORTED: u8 = 11;
    /// `watch --exit-on-terminal`: the action TIMED_OUT.
    pub const TIMED_OUT: u8 = 12;
}

/// The exit code table, as shown at the end of `actionsctl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
   0  success; for `watch --exit-on-terminal`: the action SUCCEEDED (or RECOVERED)
   1  any other error (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)
   2  bad command line
   3  invalid input: INVALID_ARGUMENT, or a file or value actionsctl rejected
   4  NOT_FOUND
   5  conflict: ALREADY_EXISTS, FAILED_PRECONDITION or ABORTED
   6  daemon unreachable: UNAVAILABLE, DEADLINE_EXCEEDED, cannot connect,
      --timeout or --wait expired
   7  RESOURCE_EXHAUSTED
  10  watch --exit-on-terminal: the action FAILED
  11  watch --exit-on-terminal: the action was ABORTED
  12  watch --exit-on-terminal: the action TIMED_OUT";

/// A failed command: printed as `error: CODE: message` on one line.
#[derive(Debug)]
pub struct Failure {
    /// The gRPC status code it stands for (`None`: a local failure).
    pub code: Option<Code>,
    pub message: String,
    pub exit: u8,
}

impl Failure {
    /// Input actionsctl rejected before sending anything.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: Some(Code::InvalidArgument),
            message: message.into(),
            exit: exit::INVALID,
        }
    }

    /// A bad command line that clap could not catch.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: None,
            message: message.into(),
            exit: exit::USAGE,
        }
    }

    /// No connection to the daemon.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some(Code::Unavailable),
            message: message.into(),
            exit: exit::UNAVAILABLE,
        }
    }

    /// Anything else that went wrong locally (e.g. writing to stdout).
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            code: None,
            message: message.into(),
            exit: exit::OTHER,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some(Code::NotFound),
            message: message.into(),
            exit: exit::NOT_FOUND,
        }
    }
}

/// The name of a status code as the gRPC spec writes it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The exit code for a status code.
pub fn exit_for(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::OutOfRange => exit::INVALID,
        Code::NotFound => exit::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => exit::CONFLICT,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::ResourceExhausted => exit::EXHAUSTED,
        _ => exit::OTHER,
    }
}

/// The daemon's URL and `--timeout`, to say which timeout expired when a
/// call runs out of time (tonic reports it as CANCELLED "Timeout expired").
/// Set once by `ctl::run`, before any call.
static CALL_TIMEOUT: std::sync::OnceLock<(String, std::time::Duration)> =
    std::sync::OnceLock::new();

pub(crate) fn set_call_timeout(url: String, timeout: std::time::Duration) {
    let _ = CALL_TIMEOUT.set((url, timeout));
}

/// Whether tonic ended the call because its own timeout (`--timeout`,
/// sent as `grpc-timeout`) expired on the client.
fn client_timeout_expired(status: &tonic::Status) -> bool {
    let mut next = std::error::Error::source(status);
    // Bounded: error chains are short; stop at 16 links regardless.
    for _ in 0..16 {
        let Some(err) = next else { break };
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = err.source();
    }
    false
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        if status.code() == Code::Cancelled && client_timeout_expired(&status) {
            let message = match CALL_TIMEOUT.get() {
                Some((url, timeout)) => format!(
                    "{url} did not answer within --timeout {} (connected; the call timed out)",
                    humantime_serde::re::humantime::format_duration(*timeout)
                ),
                None => "the call timed out (--timeout)".to_owned(),
            };
            return Self {
                code: Some(Code::DeadlineExceeded),
                message,
                exit: exit::UNAVAILABLE,
            };
        }
        let mut message = status.message().to_owned();
        if message.is_empty() {
            message = status.code().description().to_owned();
        }
        // A connection that could not be made surfaces as UNAVAILABLE with
        // the transport error as its source; name the cause.
        if let Some(source) = std::error::Error::source(&status) {
            let cause = error_chain(source);
            if !message.contains(&cause) {
                message = format!("{message}: {cause}");
            }
        }
        Self {
            code: Some(status.code()),
            message,
            exit: exit_for(status.code()),
        }
    }
}

/// An error and its causes, joined with ": ", without repeats.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    // Bounded: error chains are short; stop at 16 links regardless.
    for _ in 0..16 {
        let Some(err) = next else { break };
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the daemon's message held.
        let message = self.message.replace(['\n', '\r'], " ");
        match self.code {
            Some(code) => write!(f, "{}: {}", code_name(code), message),
            None => f.write_str(&message),
        }
    }
}

impl std::error::Error for Failure {}

pub type Result<T, E = Failure> = std::result::Result<T, E>;
