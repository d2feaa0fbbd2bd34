//! Deleting finished runs (retention and `actionsctl delete-run`).
//!
//! A batch locks the runs it deletes with `FOR UPDATE SKIP LOCKED`: a run a
//! writer holds is skipped rather than waited for, and writers wait at
//! most one small batch for a run being deleted (whose writes would be
//! refused anyway: every action of it is terminal).
//!
//! A run is taken only once every daemon with a live feed position has
//! read past all of its events (`feed_positions`), so no feed ever misses
//! an event that retention deletes. Deleted runs are queued in
//! `run_purges` in the same transaction, for their blobs and logs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::{db_error, PgStore};
use crate::domain::{Error, RunId};
use crate::store::sql;
use crate::store::{Deleted, FeedCursor};

pub(super) async fn delete_finished_runs(
    store: &PgStore,
    finished_before: DateTime<Utc>,
    limit: usize,
) -> Result<Deleted, Error> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // The oldest runs first, locked; of those, the runs with an event that
    // a live feed position has not passed yet are left for a later pass.
    // The feed check runs on the few runs of the batch only (one probe of
    // events_action_idx each), not on every candidate.
    let rows = sqlx::query(&format!(
        "WITH floor AS (SELECT xid, seq FROM feed_positions WHERE expires_at > now() \
             ORDER BY xid, seq LIMIT 1) \
         SELECT c.org, c.project, c.domain, c.name FROM ({finished}) c \
         WHERE NOT EXISTS (SELECT 1 FROM events e, floor f \
             WHERE e.org = c.org AND e.project = c.project AND e.domain = c.domain \
               AND e.run_name = c.name AND (e.xid, e.seq) > (f.xid, f.seq))",
        finished = sql::finished_runs(" FOR UPDATE OF r SKIP LOCKED")
    ))
    .bind(finished_before)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let runs: Vec<RunId> = rows
        .iter()
        .map(|row| RunId {
            org: row.get(0),
            project: row.get(1),
            domain: row.get(2),
            name: row.get(3),
        })
        .collect();
    if runs.is_empty() {
        return Ok(Deleted::default());
    }
    let deleted = delete_runs(&mut tx, &runs).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(deleted)
}

pub(super) async fn delete_run(store: &PgStore, run: &RunId) -> Result<Deleted, Error> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    sql::check_deletable::<sqlx::Postgres>(&mut tx, run, " FOR UPDATE", db_error).await?;
    let deleted = delete_runs(&mut tx, std::slice::from_ref(run)).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(deleted)
}

/// Queues the runs' blobs and logs for purging and deletes their events,
/// actions and rows, in one statement: its parts see one snapshot, and the
/// foreign keys (an action's run, its parent) are checked when it ends,
/// when every row of the runs is gone.
async fn delete_runs(conn: &mut PgConnection, runs: &[RunId]) -> Result<Deleted, Error> {
    let column = |get: fn(&RunId) -> &String| runs.iter().map(get).collect::<Vec<_>>();
    let of_runs = |table: &str, run_column: &str| {
        format!(
            "DELETE FROM {table} t USING v \
             WHERE t.org = v.org AND t.project = v.project AND t.domain = v.domain \
               AND t.{run_column} = v.name RETURNING 1"
        )
    };
    let (events, actions, runs_deleted): (i64, i64, i64) = sqlx::query_as(&format!(
        "WITH v AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
             AS v(org, project, domain, name)), \
         purge AS (INSERT INTO run_purges (org, project, domain, name) SELECT * FROM v \
             ON CONFLICT DO NOTHING), \
         e AS ({}), a AS ({}), r AS ({}) \
         SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM a), (SELECT count(*) FROM r)",
        of_runs("events", "run_name"),
        of_runs("actions", "run_name"),
        of_runs("runs", "name"),
    ))
    .bind(column(|r| &r.org))
    .bind(column(|r| &r.project))
    .bind(column(|r| &r.domain))
    .bind(column(|r| &r.name))
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Deleted {
        events: count(events),
        actions: count(actions),
        runs: count(runs_deleted),
    })
}

pub(super) async fn record_feed_position(
    store: &PgStore,
    daemon: &str,
    cursor: Option<FeedCursor>,
    ttl: Duration,
) -> Result<(), Error> {
    let query = match cursor {
        Some(cursor) => sqlx::query(
            "INSERT INTO feed_positions (daemon, xid, seq, expires_at) \
             VALUES ($1, $2::text::xid8, $3, now() + $4 * interval '1 millisecond') \
             ON CONFLICT (daemon) DO UPDATE \
             SET xid = EXCLUDED.xid, seq = EXCLUDED.seq, expires_at = EXCLUDED.expires_at",
        )
        .bind(daemon)
        .bind(cursor.major.to_string())
        .bind(cursor.minor)
        .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        // Expired positions of other daemons go too: nothing reads them.
        None => sqlx::query(
            "DELETE FROM feed_positions WHERE daemon = $1 OR expires_at < now() - interval '1 day'",
        )
        .bind(daemon),
    };
    query.execute(&store.pool).await.map_err(db_error)?;
    Ok(())
}

pub(super) async fn purged(store: &PgStore, run: &RunId) -> Result<(), Error> {
    sql::purged(&store.pool, run).await.map_err(db_error)
}
