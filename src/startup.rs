//! Start-up errors as a person reads them: one line saying what failed,
//! and when actionsd knows the usual fix, a second line saying what to do.
//!
//! `main` prints this instead of returning the error, so that the chain is
//! not repeated ("Caused by: 0: … 1: …") and no backtrace is printed, even
//! with `RUST_BACKTRACE=1`. The causes are recognised by type (the config
//! error, sqlx's error and its SQLSTATE, the I/O error kind), never by
//! message text. Written by hand: this is a table of actionsd's own
//! advice, not something a library knows.

use std::io;

use crate::config::ConfigError;
use crate::store::sqlite::OpenError;

/// What `main` prints for a failed start: the error, and what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// What failed, with its causes, on one line.
    pub error: String,
    /// What to do about it, when known.
    pub hint: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error: {}", self.error)?;
        if let Some(hint) = &self.hint {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

const URL_HINT: &str = "(--database-url or ACTIONSD_DATABASE_URL)";

/// Describes a start-up failure of `actionsd serve` or `actionsd migrate`.
pub fn describe(err: &anyhow::Error) -> Report {
    let error = one_line(err);
    let hint = err.chain().find_map(hint_for);
    // A login failure is not "cannot reach the database": the database
    // answered. Say what it answered instead of the generic context.
    let error = match err.chain().find_map(sqlstate) {
        Some((code, message)) if is_login_failure(&code) => {
            format!("the database refused the login: {message}")
        }
        Some((code, message)) if code == "3D000" => {
            format!("the database does not exist: {message}")
        }
        _ => error,
    };
    Report { error, hint }
}

/// The error and its causes joined with ": ", each cause left out when
/// the text so far already says it (sqlx repeats its source's message).
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        // Multi-line messages (e.g. a TOML snippet) are folded.
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn sqlstate(cause: &(dyn std::error::Error + 'static)) -> Option<(String, String)> {
    let sqlx::Error::Database(db) = cause.downcast_ref::<sqlx::Error>()? else {
        return None;
    };
    Some((db.code()?.into_owned(), db.message().to_owned()))
}

/// 28000 invalid_authorization_specification (e.g. an unknown role, or no
/// pg_hba.conf entry), 28P01 invalid_password.
fn is_login_failure(code: &str) -> bool {
    code == "28000" || code == "28P01"
}

fn hint_for(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(config) = cause.downcast_ref::<ConfigError>() {
        return Some(match config {
            ConfigError::Read { .. } => "check the path given with --config or ACTIONSD_CONFIG".into(),
            ConfigError::Parse { .. } => {
                "fix the file; config/actionsd.toml lists every setting with its default".into()
            }
            ConfigError::Invalid { .. } => {
                "fix the setting (flag, ACTIONSD_* variable or config file); see `actionsd serve --help`"
                    .into()
            }
            ConfigError::InsecurePublicListener { .. } => {
                "listen on 127.0.0.1 for local use; or configure [tls] and authentication \
                 (docs/security.md); or, on a network you trust, pass \
                 --dangerously-allow-insecure-public-listener"
                    .into()
            }
        });
    }
    if let Some(tls) = cause.downcast_ref::<crate::tls::TlsError>() {
        return Some(match tls {
            crate::tls::TlsError::Read { .. } => {
                "check tls.cert, tls.key and tls.client_ca (--tls-cert, --tls-key, --tls-client-ca)".into()
            }
            crate::tls::TlsError::Invalid { .. } => {
                "give PEM files: the certificate chain (server first), its private key, and CA certificates for tls.client_ca".into()
            }
        });
    }
    if let Some(open) = cause.downcast_ref::<OpenError>() {
        return match open {
            OpenError::MissingDir { .. } => Some(format!(
                "create the directory, or fix the path in the sqlite:// URL {URL_HINT}"
            )),
            OpenError::Locked { .. } => {
                Some("stop the other daemon, or give this one another file".into())
            }
            _ => None,
        };
    }
    if let Some(sqlx) = cause.downcast_ref::<sqlx::Error>() {
        return match sqlx {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some(code) if is_login_failure(code) => Some(format!(
                    "check the user name and password in the database URL {URL_HINT}"
                )),
                Some("3D000") => Some(format!(
                    "run `actionsd migrate` (it creates the database), or fix the database name {URL_HINT}"
                )),
                // insufficient_privilege: e.g. CREATE DATABASE without CREATEDB.
                Some("42501") => Some(
                    "give the role the privilege, or have a role that has it run `actionsd migrate`"
                        .into(),
                ),
                // undefined_table: the migrations table itself is missing.
                Some("42P01") => Some("run `actionsd migrate` first".into()),
                _ => None,
            },
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => Some(format!(
                "check that Postgres is running and that the host and port in the database URL are right {URL_HINT}"
            )),
            sqlx::Error::Tls(_) => Some(format!(
                "check sslmode in the database URL {URL_HINT} and the server's certificate"
            )),
            sqlx::Error::Configuration(_) => Some(format!(
                "fix the database URL {URL_HINT}, e.g. postgres://user@host:5432/actionsd"
            )),
            _ => None,
        };
    }
    if let Some(crate::store::postgres::MigrationCheck::Missing(_)) = cause.downcast_ref() {
        return Some(
            "database.migrate_on_start is false: run `actionsd migrate` with the same --database-url, then start again"
                .into(),
        );
    }
    if let Some(io) = cause.downcast_ref::<io::Error>() {
        return match io.kind() {
            io::ErrorKind::AddrInUse => Some(
                "another process listens there (another actionsd?): stop it, or choose another address with --listen"
                    .into(),
            ),
            io::ErrorKind::AddrNotAvailable => {
                Some("listen on an address of this machine, e.g. --listen 127.0.0.1:8091".into())
            }
            io::ErrorKind::PermissionDenied => {
                Some("choose a port above 1023, or run with the needed permission".into())
            }
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_causes_are_printed_once() {
        let inner = io::Error::new(io::ErrorKind::AddrInUse, "address in use");
        let err = anyhow::Error::new(inner).context("cannot listen on 127.0.0.1:8091");
        let report = describe(&err);
        assert_eq!(
            report.error,
            "cannot listen on 127.0.0.1:8091: address in use"
        );
        assert!(report.hint.unwrap().contains("--listen"));
    }
}
