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

use super::{db_error, now_micros, SqliteStore, TERMINAL_PHASES};
use crate::domain::{Error, RunId};
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
        "SELECT c.org, c.project, c.domain, c.name FROM ( \
         SELECT r.org, r.project, r.domain, r.name FROM actions a \
         JOIN runs r ON r.org = a.org AND r.project = a.project AND r.domain = a.domain \
             AND r.name = a.run_name AND r.root_name = a.name \
         WHERE a.parent_name IS NULL AND a.end_time < ?1 AND a.phase IN {TERMINAL_PHASES} \
           AND NOT EXISTS (SELECT 1 FROM actions c \
               WHERE c.org = a.org AND c.project = a.project AND c.domain = a.domain \
                 AND c.run_name = a.run_name AND c.phase NOT IN {TERMINAL_PHASES}) \
         ORDER BY a.end_time \
         LIMIT ?2) c \
         WHERE NOT EXISTS (SELECT 1 FROM events e \
             WHERE e.org = c.org AND e.project = c.project AND e.domain = c.domain \
               AND e.run_name = c.name \
               AND e.seq > (SELECT min(seq) FROM feed_positions WHERE expires_at > ?3))"
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
    let found = sqlx::query(
        "SELECT 1 FROM runs WHERE org = ?1 AND project = ?2 AND domain = ?3 AND name = ?4",
    )
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    if found.is_none() {
        return Err(Error::RunNotFound(run.clone()));
    }
    let going: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM actions \
         WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 \
           AND phase NOT IN {TERMINAL_PHASES}"
    ))
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    if going > 0 {
        return Err(Error::FailedPrecondition(format!(
            "run {run} is still going: {going} of its actions have not finished; abort it first"
        )));
    }
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
    for (table, run_column) in [
        ("events", "run_name"),
        ("actions", "run_name"),
        ("runs", "name"),
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
        let count = result.rows_affected();
        match table {
            "events" => deleted.events = count,
            "actions" => deleted.actions = count,
            _ => deleted.runs = count,
        }
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

pub(super) async fn pending_purges(store: &SqliteStore, limit: usize) -> Result<Vec<RunId>, Error> {
    let rows = sqlx::query(
        "SELECT org, project, domain, name FROM run_purges ORDER BY deleted_at LIMIT ?1",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| RunId {
            org: row.get(0),
            project: row.get(1),
            domain: row.get(2),
            name: row.get(3),
        })
        .collect())
}

pub(super) async fn purged(store: &SqliteStore, run: &RunId) -> Result<(), Error> {
    let _writer = store.writer.lock().await;
    sqlx::query(
        "DELETE FROM run_purges WHERE org = ?1 AND project = ?2 AND domain = ?3 AND name = ?4",
    )
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .execute(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(())
}
