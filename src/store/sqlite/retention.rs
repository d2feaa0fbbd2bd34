//! Deleting finished runs (retention and `actionsctl delete-run`). Each
//! batch is one short write transaction, queued behind this daemon's other
//! writers like any write.
//!
//! A run is taken only once every live feed position (`feed_positions`)
//! is past all of its events, and deleted runs are queued in `run_purges`
//! for their blobs and logs, as on Postgres.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::{db_error, now_micros, SqliteStore};
use crate::domain::{Error, RunId};
use crate::store::sql;
use crate::store::{Deleted, FeedCursor};

pub(super) async fn delete_finished_runs(
    store: &SqliteStore,
    finished_before: DateTime<Utc>,
    limit: usize,
) -> Result<Deleted, Error> {
    let _writer = store.writer.lock().await;
    let mut tx = store
        .pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(db_error)?;
    // The oldest runs first; of those, the runs with an event that a live
    // feed position has not passed yet are left for a later pass (checked
    // on the runs of the batch only).
    let rows = sqlx::query(&format!(
        "SELECT c.org, c.project, c.domain, c.name FROM ({finished}) c \
         WHERE NOT EXISTS (SELECT 1 FROM events e \
             WHERE e.org = c.org AND e.project = c.project AND e.domain = c.domain \
               AND e.run_name = c.name \
               AND e.seq > (SELECT min(seq) FROM feed_positions WHERE expires_at > $3))",
        finished = sql::finished_runs("")
    ))
    .bind(finished_before.timestamp_micros())
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(now_micros())
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let mut deleted = Deleted::default();
    for row in &rows {
        let run = RunId {
            org: row.get(0),
            project: row.get(1),
            domain: row.get(2),
            name: row.get(3),
        };
        deleted += delete_one(&mut tx, &run).await?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(deleted)
}

pub(super) async fn delete_run(store: &SqliteStore, run: &RunId) -> Result<Deleted, Error> {
    let _writer = store.writer.lock().await;
    let mut tx = store
        .pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(db_error)?;
    sql::check_deletable::<sqlx::Sqlite>(&mut tx, run, "", db_error).await?;
    let deleted = delete_one(&mut tx, run).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(deleted)
}

/// Deletes one run's events, actions and row. All of the run's actions go
/// in one statement: SQLite checks immediate foreign keys (the parent
/// reference) when the statement ends, as Postgres does.
async fn delete_one(conn: &mut SqliteConnection, run: &RunId) -> Result<Deleted, Error> {
    sqlx::query(
        "INSERT OR IGNORE INTO run_purges (org, project, domain, name) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut deleted = Deleted::default();
    // Events, then actions (whose parent references are checked when the
    // statement ends), then the run.
    for (table, run_column, count) in [
        ("events", "run_name", &mut deleted.events),
        ("actions", "run_name", &mut deleted.actions),
        ("runs", "name", &mut deleted.runs),
    ] {
        let result = sqlx::query(&format!(
            "DELETE FROM {table} \
             WHERE org = ?1 AND project = ?2 AND domain = ?3 AND {run_column} = ?4"
        ))
        .bind(&run.org)
        .bind(&run.project)
        .bind(&run.domain)
        .bind(&run.name)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        *count = result.rows_affected();
    }
    Ok(deleted)
}

pub(super) async fn record_feed_position(
    store: &SqliteStore,
    daemon: &str,
    cursor: Option<FeedCursor>,
    ttl: Duration,
) -> Result<(), Error> {
    let _writer = store.writer.lock().await;
    let now = now_micros();
    let query = match cursor {
        Some(cursor) => sqlx::query(
            "INSERT INTO feed_positions (daemon, seq, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (daemon) DO UPDATE \
             SET seq = excluded.seq, expires_at = excluded.expires_at",
        )
        .bind(daemon)
        .bind(cursor.minor)
        .bind(now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))),
        // Expired positions of other daemons go too: nothing reads them.
        None => sqlx::query("DELETE FROM feed_positions WHERE daemon = ?1 OR expires_at < ?2")
            .bind(daemon)
            .bind(now - 86_400_000_000),
    };
    query.execute(&store.pool).await.map_err(db_error)?;
    Ok(())
}

pub(super) async fn purged(store: &SqliteStore, run: &RunId) -> Result<(), Error> {
    let _writer = store.writer.lock().await;
    sql::purged(&store.pool, run).await.map_err(db_error)
}
