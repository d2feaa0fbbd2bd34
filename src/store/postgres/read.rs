//! The read API over Postgres: the statements of `store::read`, each
//! bounded by the store's statement timeout (`PgStore::within`).

use chrono::{DateTime, Utc};

use super::{db_error, PgStore};

/// An empty `bytea`, in place of a listing's specs.
const EMPTY_BLOB: &str = "''::bytea";

/// Times are bound as `timestamptz`.
fn bind_time(time: DateTime<Utc>) -> DateTime<Utc> {
    time
}

read_store_of_every_backend!(PgStore);
