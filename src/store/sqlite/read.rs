//! The read API over SQLite: the statements of `store::read`, with times
//! bound as the stored microseconds.

use chrono::{DateTime, Utc};

use super::{db_error, SqliteStore};

/// An empty blob, in place of a listing's specs.
const EMPTY_BLOB: &str = "X''";

/// Times are stored as microseconds since the Unix epoch.
fn bind_time(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

read_store_of_every_backend!(SqliteStore);
