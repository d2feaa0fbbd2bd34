//! The Postgres store.
//!
//! Every accepted change is one transaction that updates the action row
//! (version + 1) and appends an event row. The event feed reads the events
//! table itself; see [`PgStore::read_feed`] for why it cannot skip a row.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row};
use tracing::{instrument, warn};

use super::commit::{Committers, GroupCommit};
use super::{read_bounded, snapshot_page, FeedBatch, FeedCursor, PeerListener, PeerSignal, Store};
use crate::domain::{
    decide_enqueue_existing, decide_finish, decide_signal, decide_update, output_uri, AbortAction,
    ActionId, ActionKind, ActionState, Cancellation, ClaimRequest, Command, Current, EnqueueAction,
    Error, FinishAction, HeartbeatOutcome, Lease, Page, Phase, ReapOutcome, ReapSettings, RunId,
    SignalAction, SnapshotPosition, UpdateStatus,
};
use crate::schema;

/// The LISTEN/NOTIFY channel daemons wake each other on.
pub const CHANNEL: &str = "actionsd_events";

/// The embedded migrations of the Postgres schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The columns of an action's observable state, in [`state_from_row`] order.
macro_rules! state_columns {
    () => {
        "org, project, domain, run_name, name, parent_name, version, phase, attempt, output_uri, error, value, queue, lease_holder, kind, run_output_base, address"
    };
}

/// Appends the state rows returned by the `changed` CTE to the event log.
macro_rules! insert_events_from_changed {
    () => {
        concat!(
            " INSERT INTO events (",
            state_columns!(),
            ") SELECT ",
            state_columns!(),
            " FROM changed"
        )
    };
}

const TERMINAL_PHASES: &str = "(5, 6, 7, 8, 10)";

mod read;
mod retention;
mod time;

pub struct PgStore {
    pool: PgPool,
    /// Connection options with the session bounds set (see [`PgStore::connect`]).
    options: PgConnectOptions,
    /// Connection options for migrations, which may run long.
    migrate_options: PgConnectOptions,
    /// The client-side bound on each store operation.
    timeout: Duration,
    group: GroupCommit,
    /// Started on the first write, on the runtime that makes it.
    committers: OnceLock<Committers>,
}

/// Pool settings for [`PgStore::connect`].
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// The server-side bound on each statement and on a transaction left
    /// idle; the client gives each operation [`CLIENT_MARGIN`] more.
    pub statement_timeout: Duration,
}

/// How much longer than `statement_timeout` the client waits for an
/// operation, so that a live server's own cancellation reports first and a
/// silent one is noticed all the same.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(1);

/// A LISTEN connection that received nothing for this long is probed with
/// a query (bounded like any other), so a silent network is noticed.
const LISTEN_PROBE_AFTER: Duration = Duration::from_secs(15);

/// Server-side TCP keepalive of each session, in seconds (idle, interval,
/// count): Postgres drops the connections of a vanished daemon. sqlx sets
/// no keepalive on its own sockets; the client side relies on the
/// operation bound and on the LISTEN probe instead.
const SERVER_KEEPALIVE: (u32, u32, u32) = (30, 10, 3);

/// Runs a store operation within `timeout`; past it the operation is
/// dropped (its transaction, if any, never commits unless its COMMIT was
/// already sent) and the caller gets UNAVAILABLE.
async fn bounded<T>(
    timeout: Duration,
    operation: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> Error {
    warn!(?timeout, "the database did not answer in time");
    Error::Unavailable(format!(
        "the database did not answer within {} ms; retry later",
        timeout.as_millis()
    ))
}

impl PgStore {
    /// Creates the connection pool. Connections are made on demand, so a
    /// database that goes away later yields UNAVAILABLE and is reconnected
    /// to when it returns.
    ///
    /// Every session gets `statement_timeout` and
    /// `idle_in_transaction_session_timeout` (so the server ends what a
    /// vanished or stalled client left running) and server-side TCP
    /// keepalive; every operation is bounded on the client too, so a
    /// database that stops answering (a network blackhole) yields
    /// UNAVAILABLE in bounded time instead of a hang.
    pub fn connect(options: PgConnectOptions, settings: &PoolSettings) -> Self {
        let migrate_options = options.clone().application_name("actionsd-migrate");
        let millis = settings.statement_timeout.as_millis().max(1).to_string();
        let (idle, interval, count) = SERVER_KEEPALIVE;
        let options = options.application_name("actionsd").options([
            ("statement_timeout", millis.clone()),
            ("idle_in_transaction_session_timeout", millis),
            ("tcp_keepalives_idle", idle.to_string()),
            ("tcp_keepalives_interval", interval.to_string()),
            ("tcp_keepalives_count", count.to_string()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.clone());
        Self {
            pool,
            options,
            migrate_options,
            timeout: settings.statement_timeout + CLIENT_MARGIN,
            group: GroupCommit::default(),
            committers: OnceLock::new(),
        }
    }

    /// Sets how writes are grouped into transactions (see
    /// [`GroupCommit`]); the default is 4 committers of up to 64 commands.
    pub fn with_group_commit(mut self, group: GroupCommit) -> Self {
        self.group = group;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    ///
    /// On a connection of its own without the statement bound: building an
    /// index over a large table may take longer than any request should.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.migrate_options.clone())
            .await?;
        let result = MIGRATOR.run(&pool).await;
        pool.close().await;
        result
    }

    /// Fails unless every embedded migration has been applied.
    pub async fn check_migrations(&self) -> Result<(), MigrationCheck> {
        let all = || MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>();
        let applied: Vec<i64> = match sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(applied) => applied,
            // undefined_table: no migration was ever applied.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
                return Err(MigrationCheck::Missing(all()))
            }
            Err(err) => return Err(MigrationCheck::Read(err)),
        };
        let missing: Vec<i64> = all().into_iter().filter(|v| !applied.contains(v)).collect();
        if applied.iter().any(|v| !all().contains(v)) {
            let message = super::check_applied(&applied, &MIGRATOR)
                .err()
                .unwrap_or_default();
            return Err(MigrationCheck::Unknown(message));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(MigrationCheck::Missing(missing))
        }
    }
}

/// Why [`PgStore::check_migrations`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationCheck {
    #[error("cannot read the applied migrations")]
    Read(#[source] sqlx::Error),
    #[error("the database lacks migrations {0:?}")]
    Missing(Vec<i64>),
    /// Migrations this binary does not know were applied (by a newer
    /// actionsd).
    #[error("{0}")]
    Unknown(String),
}

#[async_trait]
impl Store for PgStore {
    #[instrument(skip_all, fields(action = %command.action_id()))]
    async fn execute(&self, command: Command) -> Result<usize, Error> {
        let committers = self.committers.get_or_init(|| {
            let pool = self.pool.clone();
            let timeout = self.timeout;
            Committers::spawn(
                self.group,
                Arc::new(move |commands| {
                    let count = commands.len();
                    let batch = commit_batch(pool.clone(), commands);
                    Box::pin(async move {
                        match tokio::time::timeout(timeout, batch).await {
                            Ok(results) => results,
                            Err(_) => vec![Err(timed_out(timeout)); count],
                        }
                    })
                }),
            )
        });
        committers.execute(command).await
    }

    #[instrument(skip_all, fields(action = %parent))]
    async fn watch_snapshot(
        &self,
        parent: &ActionId,
        after: Option<&SnapshotPosition>,
        limit: usize,
    ) -> Result<Page<ActionState, SnapshotPosition>, Error> {
        bounded(self.timeout, async move {
            let rows = sqlx::query(concat!(
                "SELECT ",
                state_columns!(),
                ", created_at FROM actions",
                " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4",
                " AND ((NOT $6 AND name = $5) OR (parent_name = $5",
                "   AND ($7::timestamptz IS NULL OR (created_at, name) > ($7, $8))))",
                " ORDER BY name = $5 DESC, created_at, name LIMIT $9"
            ))
            .bind_id(parent)
            .bind(after.is_some())
            .bind(after.map(|a| a.created_at))
            .bind(after.map(|a| a.name.as_str()))
            .bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
            .fetch(&self.pool);
            let rows = read_bounded(
                rows,
                |row| {
                    let state = state_from_row(row)?;
                    let position = SnapshotPosition {
                        created_at: time::get(row, "created_at")?,
                        name: state.id.name.clone(),
                    };
                    Ok((state, position))
                },
                |(state, _)| state.approximate_size(),
                limit,
                db_error,
            )
            .await?;
            snapshot_page(parent, after.is_none(), rows, limit)
        })
        .await
    }

    async fn feed_start(&self) -> Result<FeedCursor, Error> {
        bounded(self.timeout, async move {
            let horizon: String =
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
            Ok(FeedCursor {
                major: parse_xid(&horizon)?,
                minor: 0,
            })
        })
        .await
    }

    /// Reads events in (xid, seq) order, only from transactions older than
    /// the oldest transaction still running (the snapshot's xmin).
    ///
    /// Sequence numbers are taken when a row is inserted, not when its
    /// transaction commits, so reading by `seq` alone can pass over a row
    /// whose transaction commits later. Every transaction below xmin has
    /// finished and no new transaction can get an id below it, so the set
    /// of rows below xmin is final: walking it in (xid, seq) order never
    /// skips a row. Rows above xmin are read once xmin passes them.
    async fn read_feed(&self, cursor: FeedCursor, limit: usize) -> Result<FeedBatch, Error> {
        bounded(self.timeout, async move {
            // The horizon is computed once (MATERIALIZED) and reaches the
            // pending check as a parameter, and ORDER BY … LIMIT 1 makes that
            // check one probe of events_feed_idx. Written as EXISTS over the
            // inlined snapshot function it was a scan of the whole events
            // table on every read.
            let row = sqlx::query(
                "WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x) \
                 SELECT h.x::text AS horizon, \
                   (SELECT xid FROM events WHERE xid >= (SELECT x FROM h) ORDER BY xid LIMIT 1) \
                     IS NOT NULL AS pending \
                 FROM h",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
            let horizon: String = row.try_get("horizon").map_err(db_error)?;
            let pending: bool = row.try_get("pending").map_err(db_error)?;

            let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = sqlx::query(concat!(
                "SELECT xid::text AS xid_text, seq, \
                 (extract(epoch FROM created_at) * 1000000)::bigint AS written_micros, ",
                state_columns!(),
                " FROM events WHERE (xid, seq) > ($1::text::xid8, $2) AND xid < $3::text::xid8",
                " ORDER BY xid, seq LIMIT $4"
            ))
            .bind(cursor.major.to_string())
            .bind(cursor.minor)
            .bind(&horizon)
            .bind(limit_i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;

            let mut batch = FeedBatch {
                cursor,
                more: rows.len() >= limit,
                pending,
                events: Vec::with_capacity(rows.len()),
                written_micros: Vec::with_capacity(rows.len()),
            };
            for row in &rows {
                let xid: String = row.try_get("xid_text").map_err(db_error)?;
                batch.cursor = FeedCursor {
                    major: parse_xid(&xid)?,
                    minor: row.try_get("seq").map_err(db_error)?,
                };
                batch.events.push(state_from_row(row)?);
                batch
                    .written_micros
                    .push(row.try_get("written_micros").map_err(db_error)?);
            }
            Ok(batch)
        })
        .await
    }

    async fn notify_peers(&self) -> Result<(), Error> {
        bounded(self.timeout, async move {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(CHANNEL)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        if let Some(committers) = self.committers.get() {
            committers.close().await;
        }
        self.pool.close().await;
    }

    #[instrument(skip_all, fields(executor = %request.executor, queue = %request.queue))]
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Lease>, Error> {
        bounded(self.timeout, async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let (held, waiting): (i64, i64) = sqlx::query_as(&format!(
                "SELECT count(*), count(*) FILTER (WHERE $2 AND EXISTS ( \
                   SELECT 1 FROM actions c \
                   WHERE (c.org, c.project, c.domain, c.run_name, c.parent_name) \
                       = (a.org, a.project, a.domain, a.run_name, a.name) \
                     AND c.phase NOT IN {TERMINAL_PHASES})) \
                 FROM actions a WHERE a.lease_holder = $1 AND a.lease_deadline IS NOT NULL \
                 AND a.phase NOT IN {TERMINAL_PHASES}"
            ))
            .bind(&request.executor)
            .bind(request.max_leases > 0)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            let free = super::free_leases(request, held, waiting);
            if free <= 0 {
                tx.commit().await.map_err(db_error)?;
                return Ok(Vec::new());
            }
            // Oldest first, a page at a time; rows locked by another claimer
            // are skipped, so claimers never wait for each other and never
            // lease one attempt twice. Paging goes on past runs that are at
            // their concurrency limit, which are remembered so that their
            // backlog costs no further queries.
            let page_size = free * 2 + 16;
            let mut leases = Vec::new();
            let mut full_runs: std::collections::HashSet<RunId> = std::collections::HashSet::new();
            let mut after: Option<(chrono::DateTime<chrono::Utc>, ActionId)> = None;
            'pages: loop {
                let (after_time, after_id) = match &after {
                    Some((time, id)) => (Some(*time), Some(id.clone())),
                    None => (None, None),
                };
                let after_id = after_id.as_ref();
                let page = sqlx::query(
                    "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.created_at, \
                            r.max_action_concurrency \
                     FROM actions a JOIN runs r \
                       ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
                     WHERE a.queue = $1 AND a.phase = 1 AND a.kind = 1 \
                       AND ($3::timestamptz IS NULL \
                            OR (a.created_at, a.org, a.project, a.domain, a.run_name, a.name) \
                               > ($3, $4, $5, $6, $7, $8)) \
                     ORDER BY a.created_at, a.org, a.project, a.domain, a.run_name, a.name \
                     LIMIT $2 FOR UPDATE OF a SKIP LOCKED",
                )
                .bind(&request.queue)
                .bind(page_size)
                .bind(after_time)
                .bind(after_id.map(|id| id.run.org.as_str()))
                .bind(after_id.map(|id| id.run.project.as_str()))
                .bind(after_id.map(|id| id.run.domain.as_str()))
                .bind(after_id.map(|id| id.run.name.as_str()))
                .bind(after_id.map(|id| id.name.as_str()))
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                let last_page = i64::try_from(page.len()).unwrap_or(i64::MAX) < page_size;
                // Candidates of unlimited runs are leased together, one
                // statement per page. A run with a concurrency limit counts its
                // live leases, so what is pending is leased before it counts.
                let mut chosen: Vec<ActionId> = Vec::new();
                for candidate in &page {
                    let taken = leases.len() + chosen.len();
                    if i64::try_from(taken).unwrap_or(i64::MAX) >= free {
                        break;
                    }
                    let id = action_id_from_row(candidate)?;
                    after = Some((time::get(candidate, "created_at")?, id.clone()));
                    let limit: i32 = candidate
                        .try_get("max_action_concurrency")
                        .map_err(db_error)?;
                    if limit > 0 {
                        if full_runs.contains(&id.run) {
                            continue;
                        }
                        leases.extend(lease_all(&mut tx, &chosen, request).await?);
                        chosen.clear();
                        if !run_has_room(&mut tx, &id.run, limit).await? {
                            full_runs.insert(id.run.clone());
                            continue;
                        }
                    }
                    chosen.push(id);
                }
                leases.extend(lease_all(&mut tx, &chosen, request).await?);
                if i64::try_from(leases.len()).unwrap_or(i64::MAX) >= free {
                    break 'pages;
                }
                if last_page || page.is_empty() {
                    break;
                }
            }
            tx.commit().await.map_err(db_error)?;
            Ok(leases)
            })
        .await
    }

    async fn leases_of(&self, executor: &str) -> Result<Vec<Lease>, Error> {
        bounded(self.timeout, async move {
            let rows = sqlx::query(&format!(
                "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.spec, a.attempt, \
                        a.lease_deadline, a.run_output_base, r.run_spec \
                 FROM actions a JOIN runs r \
                   ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
                 WHERE a.lease_holder = $1 AND a.lease_deadline IS NOT NULL \
                   AND a.phase NOT IN {TERMINAL_PHASES} \
                 ORDER BY a.created_at, a.name"
            ))
            .bind(executor)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
            rows.iter().map(lease_from_row).collect()
            })
        .await
    }

    #[instrument(skip_all, fields(executor = %executor))]
    async fn heartbeat(&self, executor: &str, ttl: Duration) -> Result<HeartbeatOutcome, Error> {
        bounded(self.timeout, async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let released = sqlx::query(&format!(
                "UPDATE actions SET lease_deadline = NULL \
                 WHERE lease_holder = $1 AND lease_deadline IS NOT NULL AND phase IN {TERMINAL_PHASES} \
                 RETURNING org, project, domain, run_name, name, attempt, phase, abort_reason"
            ))
            .bind(executor)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            let mut cancelled = Vec::new();
            for row in &released {
                if phase_from_db(row.try_get("phase").map_err(db_error)?)? != Phase::Aborted {
                    continue;
                }
                cancelled.push(Cancellation {
                    id: action_id_from_row(row)?,
                    attempt: attempt_from_db(row.try_get("attempt").map_err(db_error)?)?,
                    reason: row
                        .try_get::<Option<String>, _>("abort_reason")
                        .map_err(db_error)?
                        .unwrap_or_default(),
                });
            }
            let deadline = sqlx::query_scalar(&format!(
                "WITH extended AS (UPDATE actions SET lease_deadline = now() + make_interval(secs => $2) \
                   WHERE lease_holder = $1 AND lease_deadline IS NOT NULL AND phase NOT IN {TERMINAL_PHASES}) \
                 SELECT now() + make_interval(secs => $2)"
            ))
            .bind(executor)
            .bind(ttl.as_secs_f64())
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            Ok(HeartbeatOutcome {
                deadline,
                cancelled,
            })
            })
        .await
    }

    async fn reap(&self, settings: &ReapSettings) -> Result<ReapOutcome, Error> {
        bounded(self.timeout, async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let max = i64::from(settings.max_system_retries);
            // Expired leases: requeue with the next attempt while retries are
            // left, else fail with a SYSTEM error. Rows another reaper is
            // handling are skipped.
            let phases: Vec<i16> = sqlx::query_scalar(&format!(
                concat!(
                    "WITH expired AS (",
                    "  SELECT org, project, domain, run_name, name FROM actions",
                    "  WHERE lease_deadline < now() AND phase NOT IN {terminal} FOR UPDATE SKIP LOCKED",
                    "), changed AS (",
                    "  UPDATE actions a SET",
                    "    phase = CASE WHEN a.attempt <= $1 THEN 1 ELSE 6 END,",
                    "    attempt = CASE WHEN a.attempt <= $1 THEN a.attempt + 1 ELSE a.attempt END,",
                    "    error = CASE WHEN a.attempt <= $1 THEN a.error ELSE $2 END,",
                    "    end_time = CASE WHEN a.attempt <= $1 THEN a.end_time ELSE now() END,",
                    "    lease_holder = NULL, lease_deadline = NULL,",
                    "    version = a.version + 1, updated_at = now()",
                    "  FROM expired e",
                    "  WHERE (a.org, a.project, a.domain, a.run_name, a.name)",
                    "      = (e.org, e.project, e.domain, e.run_name, e.name)",
                    "  RETURNING a.*",
                    ")",
                    insert_events_from_changed!(),
                    " RETURNING phase"
                ),
                terminal = TERMINAL_PHASES
            ))
            .bind(max)
            .bind(settings.lease_error.as_ref())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            // Terminal actions whose lease was never released (their executor
            // vanished before a heartbeat reported the end).
            sqlx::query(&format!(
                "UPDATE actions SET lease_deadline = NULL \
                 WHERE lease_deadline < now() AND phase IN {TERMINAL_PHASES}"
            ))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            // Conditions nobody signalled in time.
            let timed_out = sqlx::query(concat!(
                "WITH due AS (",
                "  SELECT org, project, domain, run_name, name FROM actions",
                "  WHERE kind = 3 AND phase = 9 AND deadline < now() FOR UPDATE SKIP LOCKED",
                "), changed AS (",
                "  UPDATE actions a SET phase = 8, error = $1, end_time = now(),",
                "    version = a.version + 1, updated_at = now()",
                "  FROM due d",
                "  WHERE (a.org, a.project, a.domain, a.run_name, a.name)",
                "      = (d.org, d.project, d.domain, d.run_name, d.name)",
                "  RETURNING a.*",
                ")",
                insert_events_from_changed!()
            ))
            .bind(settings.timeout_error.as_ref())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            tx.commit().await.map_err(db_error)?;
            Ok(ReapOutcome {
                requeued: phases.iter().filter(|p| **p == 1).count(),
                failed: phases.iter().filter(|p| **p == 6).count(),
                timed_out: usize::try_from(timed_out).unwrap_or(usize::MAX),
            })
            })
        .await
    }

    async fn delete_finished_runs(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<super::Deleted, Error> {
        retention::delete_finished_runs(self, finished_before, limit).await
    }

    async fn delete_run(&self, run: &RunId) -> Result<super::Deleted, Error> {
        retention::delete_run(self, run).await
    }

    async fn record_feed_position(
        &self,
        daemon: &str,
        cursor: Option<FeedCursor>,
        ttl: Duration,
    ) -> Result<(), Error> {
        retention::record_feed_position(self, daemon, cursor, ttl).await
    }

    async fn pending_purges(&self, limit: usize) -> Result<Vec<RunId>, Error> {
        retention::pending_purges(self, limit).await
    }

    async fn purged(&self, run: &RunId) -> Result<(), Error> {
        retention::purged(self, run).await
    }

    async fn queue_stats(&self, limit: usize) -> Result<super::QueueStats, Error> {
        let rows = sqlx::query(
            "SELECT COALESCE(queue, ''), count(*), min(created_at) FROM actions \
             WHERE phase = 1 AND kind = 1 GROUP BY queue ORDER BY count(*) DESC LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut queues = Vec::with_capacity(rows.len());
        for row in &rows {
            queues.push(super::QueueDepth {
                queue: row.get(0),
                queued: row.get(1),
                oldest: row.get::<DateTime<Utc>, _>(2),
            });
        }
        let leases_held: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM actions \
             WHERE lease_deadline IS NOT NULL AND phase NOT IN {TERMINAL_PHASES}"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(super::QueueStats {
            queues,
            leases_held,
        })
    }

    fn pool_stats(&self) -> super::PoolStats {
        super::PoolStats {
            open: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
        }
    }

    async fn ping(&self) -> Result<(), Error> {
        bounded(self.timeout, async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error> {
        let listener = PgPeerListener::connect(self.options.clone(), self.timeout).await?;
        Ok(Some(Box::new(listener)))
    }
}

/// The daemon's one LISTEN connection, kept outside the pool.
struct PgPeerListener {
    options: PgConnectOptions,
    timeout: Duration,
    listener: PgListener,
}

impl PgPeerListener {
    async fn connect(options: PgConnectOptions, timeout: Duration) -> Result<Self, Error> {
        bounded(timeout, async {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .connect_lazy_with(options.clone().application_name("actionsd-listener"));
            let mut listener = PgListener::connect_with(&pool).await.map_err(db_error)?;
            listener.listen(CHANNEL).await.map_err(db_error)?;
            Ok(Self {
                options,
                timeout,
                listener,
            })
        })
        .await
    }

    /// Replaces the connection with a fresh one.
    async fn reconnect(&mut self) -> Result<PeerSignal, Error> {
        *self = Self::connect(self.options.clone(), self.timeout).await?;
        Ok(PeerSignal::Reconnected)
    }
}

#[async_trait]
impl PeerListener for PgPeerListener {
    async fn next(&mut self) -> Result<PeerSignal, Error> {
        loop {
            let received = tokio::time::timeout(LISTEN_PROBE_AFTER, self.listener.try_recv()).await;
            match received {
                Ok(Ok(Some(_))) => return Ok(PeerSignal::Notified),
                Ok(Ok(None)) => {
                    warn!("event feed connection lost; reconnecting");
                    return self.reconnect().await;
                }
                Ok(Err(err)) => {
                    let err = db_error(err);
                    // Reconnect on the next call whatever the failure was.
                    return self.reconnect().await.map_err(|_| err);
                }
                Err(_) => {
                    // Quiet for a while: make sure the connection still
                    // answers (a notification arriving meanwhile is
                    // buffered by the listener and read next).
                    let probe = bounded(self.timeout, async {
                        sqlx::query("SELECT 1")
                            .execute(&mut self.listener)
                            .await
                            .map_err(db_error)
                    })
                    .await;
                    if let Err(err) = probe {
                        warn!(error = %err, "event feed connection does not answer; reconnecting");
                        return self.reconnect().await.map_err(|_| err);
                    }
                }
            }
        }
    }
}

/// Binds an action's key columns (org, project, domain, run name, name),
/// in that order, to the next five parameters.
trait BindId<'q> {
    fn bind_id(self, id: &'q ActionId) -> Self;
}

impl<'q> BindId<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_id(self, id: &'q ActionId) -> Self {
        self.bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(&id.name)
    }
}

/// Applies `commands` in one transaction, each within a savepoint: a
/// command that fails (a rule refuses it, or a statement fails) is rolled
/// back to its savepoint and reports its error, and the others commit. A
/// failed commit fails every command. When the batch meets a deadlock or a
/// serialization failure (another daemon's transaction, a claim or a
/// heartbeat locking the same rows in another order), it is rolled back —
/// nothing of it was acknowledged — and each command is retried in a
/// transaction of its own.
///
/// A batch holds at most `max_batch` subtransactions. Postgres keeps up to
/// 64 of a transaction's subtransaction ids in shared memory; beyond that
/// other sessions' snapshots must consult `pg_subtrans`, so the default
/// batch size is 64.
async fn commit_batch(pool: PgPool, commands: Vec<Command>) -> Vec<Result<usize, Error>> {
    if commands.len() > 1 {
        match apply_batch(&pool, &commands).await {
            Ok(results) => return results,
            Err(err) if is_conflict(&err) => {
                warn!(
                    commands = commands.len(),
                    "batch met a concurrent change; applying its commands one by one"
                );
            }
            Err(err) => return commands.iter().map(|_| Err(err.clone())).collect(),
        }
    }
    let mut results = Vec::with_capacity(commands.len());
    for command in &commands {
        results.push(execute_one(&pool, command).await);
    }
    results
}

/// One command in a transaction of its own.
#[instrument(skip_all, fields(action = %command.action_id()))]
async fn execute_one(pool: &PgPool, command: &Command) -> Result<usize, Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let events = apply(&mut tx, command).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(events)
}

/// The batch in one transaction; `Err` when the transaction as a whole
/// failed (nothing committed).
#[instrument(skip_all, fields(commands = commands.len()))]
async fn apply_batch(
    pool: &PgPool,
    commands: &[Command],
) -> Result<Vec<Result<usize, Error>>, Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let mut results = Vec::with_capacity(commands.len());
    for (index, command) in commands.iter().enumerate() {
        // One round trip: release the previous command's savepoint (its
        // changes stay in the transaction) and take this one's.
        let savepoint = if index == 0 {
            "SAVEPOINT command"
        } else {
            "RELEASE SAVEPOINT command; SAVEPOINT command"
        };
        sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(savepoint))
            .await
            .map_err(db_error)?;
        let result = apply(&mut tx, command).await;
        if let Err(err) = &result {
            if is_conflict(err) {
                return Err(conflict());
            }
            sqlx::Executor::execute(&mut *tx, sqlx::raw_sql("ROLLBACK TO SAVEPOINT command"))
                .await
                .map_err(db_error)?;
        }
        results.push(result);
    }
    tx.commit().await.map_err(db_error)?;
    Ok(results)
}

/// What a deadlock or serialization failure (SQLSTATE 40P01, 40001)
/// becomes: UNAVAILABLE, safe to retry.
const CONFLICT: &str = "conflicting concurrent change; retry";

fn conflict() -> Error {
    Error::Unavailable(CONFLICT.to_owned())
}

/// Whether `err` came from [`conflict`] (this module's own message).
fn is_conflict(err: &Error) -> bool {
    matches!(err, Error::Unavailable(message) if message == CONFLICT)
}

async fn apply(conn: &mut PgConnection, command: &Command) -> Result<usize, Error> {
    match command {
        Command::Enqueue(c) => enqueue(conn, c).await,
        Command::Update(c) => update(conn, c).await,
        Command::Abort(c) => abort(conn, c).await,
        Command::Signal(c) => signal(conn, c).await,
        Command::Finish(c) => finish(conn, c).await,
    }
}

async fn enqueue(conn: &mut PgConnection, action: &EnqueueAction) -> Result<usize, Error> {
    if let Some(result) = compare_existing(conn, action).await? {
        return result.map(|()| 0);
    }
    let id = &action.id;
    let run_queue = match &action.parent {
        None => {
            let run = action.run.clone().unwrap_or_default();
            let inserted = sqlx::query(
                "INSERT INTO runs (org, project, domain, name, root_name, run_spec, queue, max_action_concurrency) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT ON CONSTRAINT runs_pkey DO NOTHING",
            )
            .bind_id(id)
            .bind(run.run_spec.as_ref())
            .bind(&run.queue)
            .bind(i32::try_from(run.max_action_concurrency).unwrap_or(i32::MAX))
            .execute(&mut *conn)
            .await
            .map_err(db_error)?
            .rows_affected();
            if inserted == 0 {
                // A concurrent identical Enqueue may have won the race.
                if let Some(result) = compare_existing(conn, action).await? {
                    return result.map(|()| 0);
                }
                let root: String = sqlx::query_scalar(
                    "SELECT root_name FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4",
                )
                .bind(&id.run.org)
                .bind(&id.run.project)
                .bind(&id.run.domain)
                .bind(&id.run.name)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
                return Err(Error::AlreadyExists(format!(
                    "run {} already exists with root action '{root}'",
                    id.run
                )));
            }
            run.queue
        }
        Some(parent) => {
            // FOR SHARE: an Abort of the parent waits for this insert to
            // commit, then its cascade sees the new child.
            let row = sqlx::query(
                "SELECT a.phase, r.queue FROM actions a JOIN runs r \
                   ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
                 WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4 AND a.name = $5 \
                 FOR SHARE OF a",
            )
            .bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(parent)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::ParentNotFound(id.sibling(parent.clone())))?;
            let phase = phase_from_db(row.try_get("phase").map_err(db_error)?)?;
            if phase.is_terminal() {
                return Err(Error::ParentTerminal {
                    parent: id.sibling(parent.clone()),
                    phase,
                });
            }
            row.try_get::<Option<String>, _>("queue")
                .map_err(db_error)?
        }
    };
    let queue = (action.kind == ActionKind::Task).then(|| {
        action
            .task_queue
            .clone()
            .or(run_queue)
            .unwrap_or_else(|| "default".to_owned())
    });
    let timeout_secs = action.condition_timeout.map(|t| t.as_secs_f64());

    let inserted = sqlx::query(concat!(
        "WITH changed AS (",
        " INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,",
        "   output_uri, condition_type, deadline, run_output_base)",
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now() + make_interval(secs => $13), $14)",
        " ON CONFLICT ON CONSTRAINT actions_pkey DO NOTHING",
        " RETURNING ",
        state_columns!(),
        ")",
        insert_events_from_changed!()
    ))
    .bind_id(id)
    .bind(&action.parent)
    .bind(action.kind as i16)
    .bind(action.phase as i16)
    .bind(action.spec.as_ref())
    .bind(&queue)
    .bind(&action.output_uri)
    .bind(action.condition_type)
    .bind(timeout_secs)
    .bind(&action.run_output_base)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?
    .rows_affected();
    if inserted == 0 {
        // Lost a race with a concurrent Enqueue of the same id.
        return match compare_existing(conn, action).await? {
            Some(result) => result.map(|()| 0),
            None => Err(Error::Internal(format!(
                "action {id} neither inserted nor found"
            ))),
        };
    }
    Ok(1)
}

/// `Some(Ok)` when the action exists with the same content, `Some(Err)`
/// when it exists with different content, `None` when it does not exist.
async fn compare_existing(
    conn: &mut PgConnection,
    action: &EnqueueAction,
) -> Result<Option<Result<(), Error>>, Error> {
    let id = &action.id;
    let row = sqlx::query(
        "SELECT a.spec, r.run_spec, r.root_name = a.name AS is_root FROM actions a JOIN runs r \
           ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
         WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4 AND a.name = $5",
    )
    .bind_id(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let spec: Vec<u8> = row.try_get("spec").map_err(db_error)?;
    let run_spec: Vec<u8> = row.try_get("run_spec").map_err(db_error)?;
    let is_root: bool = row.try_get("is_root").map_err(db_error)?;
    let same_run_spec = !is_root
        || action.parent.is_some()
        || schema::same_content(
            schema::names::RUN_SPEC,
            action.run.as_ref().map_or(&[][..], |r| r.run_spec.as_ref()),
            &run_spec,
        );
    Ok(Some(decide_enqueue_existing(
        id,
        schema::same_content(schema::names::ACTION, &spec, &action.spec),
        same_run_spec,
    )))
}

/// Locks the action's row and reads what the rules need.
async fn lock_current(conn: &mut PgConnection, id: &ActionId) -> Result<Current, Error> {
    let row = sqlx::query(
        "SELECT kind, phase, attempt, parent_name, condition_type, value, lease_holder, \
                run_output_base, address FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5 FOR UPDATE",
    )
    .bind_id(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?
    .ok_or_else(|| Error::ActionNotFound(id.clone()))?;
    let kind: i16 = row.try_get("kind").map_err(db_error)?;
    Ok(Current {
        kind: ActionKind::from_db(kind)
            .ok_or_else(|| Error::Internal(format!("unknown action kind {kind}")))?,
        phase: phase_from_db(row.try_get("phase").map_err(db_error)?)?,
        attempt: attempt_from_db(row.try_get("attempt").map_err(db_error)?)?,
        parent: row.try_get("parent_name").map_err(db_error)?,
        condition_type: row.try_get("condition_type").map_err(db_error)?,
        value: row
            .try_get::<Option<Vec<u8>>, _>("value")
            .map_err(db_error)?
            .map(Bytes::from),
        lease_holder: row.try_get("lease_holder").map_err(db_error)?,
        run_output_base: row.try_get("run_output_base").map_err(db_error)?,
        address: row
            .try_get::<Option<Vec<u8>>, _>("address")
            .map_err(db_error)?
            .map(Bytes::from),
    })
}

async fn update(conn: &mut PgConnection, update: &UpdateStatus) -> Result<usize, Error> {
    let id = &update.id;
    let current = lock_current(conn, id).await?;
    let Some(next) = decide_update(id, &current, update)? else {
        return Ok(0);
    };
    sqlx::query(concat!(
        "WITH changed AS (",
        " UPDATE actions SET phase = $6, attempt = $7, version = version + 1, updated_at = now(),",
        "   start_time = COALESCE($8, start_time),",
        "   end_time = CASE WHEN $9 THEN COALESCE($10, end_time, now()) ELSE end_time END,",
        "   address = COALESCE($11, address)",
        " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
        " RETURNING ",
        state_columns!(),
        ")",
        insert_events_from_changed!()
    ))
    .bind_id(id)
    .bind(next.phase as i16)
    .bind(i64::from(next.attempt))
    .bind(update.start_time)
    .bind(next.phase.is_terminal())
    .bind(update.end_time)
    .bind(update.address.as_deref())
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(1)
}

async fn abort(conn: &mut PgConnection, abort: &AbortAction) -> Result<usize, Error> {
    let id = &abort.id;
    let current = lock_current(conn, id).await?;
    if current.phase.is_terminal() {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is already {}",
            current.phase
        )));
    }
    // Walks the whole subtree (terminal actions keep their phase, but their
    // descendants are still aborted). Repeated until nothing changes: a
    // child inserted by a concurrent Enqueue that committed while this
    // statement waited for its lock is picked up by the next round.
    let cascade = format!(
        concat!(
            "WITH RECURSIVE subtree(name) AS (",
            "  SELECT $5::text",
            "  UNION SELECT a.name FROM actions a JOIN subtree s ON a.parent_name = s.name",
            "  WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4",
            "), changed AS (",
            "  UPDATE actions a SET phase = 7, version = a.version + 1, updated_at = now(),",
            "    end_time = now(), abort_reason = $6, aborted_by = $7, error = $8",
            "  FROM subtree s",
            "  WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4",
            "    AND a.name = s.name AND a.phase NOT IN {terminal}",
            "  RETURNING a.org, a.project, a.domain, a.run_name, a.name, a.parent_name, a.version,",
            "    a.phase, a.attempt, a.output_uri, a.error, a.value, a.queue, a.lease_holder,",
            "    a.kind, a.run_output_base, a.address",
            ")",
            insert_events_from_changed!()
        ),
        terminal = TERMINAL_PHASES
    );
    let mut total = 0usize;
    loop {
        let changed = sqlx::query(&cascade)
            .bind_id(id)
            .bind(&abort.reason)
            .bind(abort.aborted_by.as_deref())
            .bind(abort.error.as_ref())
            .execute(&mut *conn)
            .await
            .map_err(db_error)?
            .rows_affected();
        if changed == 0 {
            break;
        }
        total += usize::try_from(changed).unwrap_or(usize::MAX);
    }
    Ok(total)
}

async fn signal(conn: &mut PgConnection, signal: &SignalAction) -> Result<usize, Error> {
    let id = &signal.id;
    let current = lock_current(conn, id).await?;
    if !decide_signal(id, &current, signal)? {
        return Ok(0);
    }
    sqlx::query(concat!(
        "WITH changed AS (",
        " UPDATE actions SET phase = 5, value = $6, signalled_by = $7, version = version + 1,",
        "   updated_at = now(), end_time = now()",
        " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
        " RETURNING ",
        state_columns!(),
        ")",
        insert_events_from_changed!()
    ))
    .bind_id(id)
    .bind(signal.value.literal.as_ref())
    .bind(signal.signalled_by.as_deref())
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(1)
}

/// Whether a run with `max_action_concurrency = limit` may lease one more
/// action. Locks the run row first, so that concurrent claimers of the same
/// run count one after the other and the limit holds exactly.
/// Leases `ids` (rows the transaction has locked) to the claiming executor
/// in one statement: each moves to INITIALIZING under the lease, with an
/// event. The leases come back in the order of `ids`.
async fn lease_all(
    conn: &mut PgConnection,
    ids: &[ActionId],
    request: &ClaimRequest,
) -> Result<Vec<Lease>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let column = |get: fn(&ActionId) -> &str| ids.iter().map(get).collect::<Vec<&str>>();
    let rows = sqlx::query(concat!(
        "WITH chosen AS (",
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])",
        "   AS c(org, project, domain, run_name, name)",
        "), changed AS (",
        " UPDATE actions a SET phase = 3, lease_holder = $6,",
        "   lease_deadline = now() + make_interval(secs => $7),",
        "   version = a.version + 1, updated_at = now()",
        " FROM chosen c",
        " WHERE (a.org, a.project, a.domain, a.run_name, a.name)",
        "   = (c.org, c.project, c.domain, c.run_name, c.name)",
        " RETURNING a.*",
        "), logged AS (",
        insert_events_from_changed!(),
        ")",
        " SELECT c.org, c.project, c.domain, c.run_name, c.name, c.spec, c.attempt,",
        "   c.lease_deadline, c.run_output_base, r.run_spec",
        " FROM changed c JOIN runs r",
        "   ON (r.org, r.project, r.domain, r.name) = (c.org, c.project, c.domain, c.run_name)"
    ))
    .bind(column(|id| &id.run.org))
    .bind(column(|id| &id.run.project))
    .bind(column(|id| &id.run.domain))
    .bind(column(|id| &id.run.name))
    .bind(column(|id| &id.name))
    .bind(&request.executor)
    .bind(request.lease_ttl.as_secs_f64())
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut leases = rows
        .iter()
        .map(lease_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    if leases.len() != ids.len() {
        return Err(Error::Internal(format!(
            "leased {} of {} locked actions",
            leases.len(),
            ids.len()
        )));
    }
    let position: std::collections::HashMap<&ActionId, usize> =
        ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    leases.sort_by_key(|lease| position.get(&lease.id).copied().unwrap_or(usize::MAX));
    Ok(leases)
}

async fn run_has_room(conn: &mut PgConnection, run: &RunId, limit: i32) -> Result<bool, Error> {
    sqlx::query(
        "SELECT 1 FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4 FOR UPDATE",
    )
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    let leased: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 \
         AND lease_deadline IS NOT NULL AND phase NOT IN {TERMINAL_PHASES}"
    ))
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(leased < i64::from(limit))
}

async fn finish(conn: &mut PgConnection, finish: &FinishAction) -> Result<usize, Error> {
    let id = &finish.id;
    let current = lock_current(conn, id).await?;
    if !decide_finish(id, &current, finish)? {
        return Ok(0);
    }
    let output_uri = output_uri(
        ActionKind::Task,
        finish.output_uri.as_deref().unwrap_or_default(),
        &current.run_output_base,
        &id.name,
        finish.attempt,
    );
    if finish.retry {
        // A retrying Finish: the next attempt is queued, as after a lost
        // lease; the error stays for watchers until that attempt reports.
        sqlx::query(concat!(
            "WITH changed AS (",
            " UPDATE actions SET phase = 1, attempt = attempt + 1, error = $6,",
            "   lease_holder = NULL, lease_deadline = NULL,",
            "   version = version + 1, updated_at = now()",
            " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!()
        ))
        .bind_id(id)
        .bind(finish.error.as_deref())
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        return Ok(1);
    }
    sqlx::query(concat!(
        "WITH changed AS (",
        " UPDATE actions SET phase = $6, output_uri = $7, error = $8, lease_deadline = NULL,",
        "   end_time = now(), version = version + 1, updated_at = now()",
        " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
        " RETURNING ",
        state_columns!(),
        ")",
        insert_events_from_changed!()
    ))
    .bind_id(id)
    .bind(finish.phase as i16)
    .bind(&output_uri)
    .bind(finish.error.as_deref())
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(1)
}

fn action_id_from_row(row: &PgRow) -> Result<ActionId, Error> {
    Ok(ActionId::new(
        RunId {
            org: row.try_get("org").map_err(db_error)?,
            project: row.try_get("project").map_err(db_error)?,
            domain: row.try_get("domain").map_err(db_error)?,
            name: row.try_get("run_name").map_err(db_error)?,
        },
        row.try_get::<String, _>("name").map_err(db_error)?,
    ))
}

/// A lease from a row with the action's key columns, `spec`, `attempt`,
/// `lease_deadline`, `run_output_base` and the run's `run_spec`.
fn lease_from_row(row: &PgRow) -> Result<Lease, Error> {
    let id = action_id_from_row(row)?;
    let attempt = attempt_from_db(row.try_get("attempt").map_err(db_error)?)?;
    let base: String = row.try_get("run_output_base").map_err(db_error)?;
    Ok(Lease {
        output_uri: output_uri(ActionKind::Task, "", &base, &id.name, attempt),
        id,
        spec: Bytes::from(row.try_get::<Vec<u8>, _>("spec").map_err(db_error)?),
        run_spec: Bytes::from(row.try_get::<Vec<u8>, _>("run_spec").map_err(db_error)?),
        attempt,
        deadline: time::get(row, "lease_deadline")?,
    })
}

/// An action's observable state from a row of [`state_columns!`] (of
/// `actions` or of `events`).
fn state_from_row(row: &PgRow) -> Result<ActionState, Error> {
    let id = action_id_from_row(row)?;
    let attempt = attempt_from_db(row.try_get("attempt").map_err(db_error)?)?;
    // Events written before they carried the kind hold 0: no default.
    let kind = ActionKind::from_db(row.try_get("kind").map_err(db_error)?);
    let reported: String = row.try_get("output_uri").map_err(db_error)?;
    let base: String = row.try_get("run_output_base").map_err(db_error)?;
    Ok(ActionState {
        output_uri: match kind {
            Some(kind) => output_uri(kind, &reported, &base, &id.name, attempt),
            None => reported,
        },
        id,
        parent: row.try_get("parent_name").map_err(db_error)?,
        version: row.try_get("version").map_err(db_error)?,
        phase: phase_from_db(row.try_get("phase").map_err(db_error)?)?,
        attempt,
        error: row
            .try_get::<Option<Vec<u8>>, _>("error")
            .map_err(db_error)?
            .map(Bytes::from),
        value: row
            .try_get::<Option<Vec<u8>>, _>("value")
            .map_err(db_error)?
            .map(Bytes::from),
        queue: row.try_get("queue").map_err(db_error)?,
        lease_holder: row.try_get("lease_holder").map_err(db_error)?,
        address: row
            .try_get::<Option<Vec<u8>>, _>("address")
            .map_err(db_error)?
            .map(Bytes::from),
    })
}

fn attempt_from_db(value: i64) -> Result<u32, Error> {
    u32::try_from(value)
        .map_err(|_| Error::Internal(format!("attempt {value} in the store is out of range")))
}

fn phase_from_db(value: i16) -> Result<Phase, Error> {
    Phase::from_wire(i32::from(value))
        .ok_or_else(|| Error::Internal(format!("unknown phase {value} in the store")))
}

fn parse_xid(text: &str) -> Result<i64, Error> {
    text.parse()
        .map_err(|_| Error::Internal(format!("unexpected transaction id {text:?}")))
}

/// Turns a database failure into a domain error, by error class and
/// SQLSTATE only. The cause is logged here; clients see a short message.
fn db_error(err: sqlx::Error) -> Error {
    let unavailable = |err: &sqlx::Error| {
        warn!(error = %err, "database unavailable");
        Error::Unavailable("database unavailable; retry later".to_owned())
    };
    match &err {
        // A connection reset or cut mid-conversation surfaces as Io or,
        // when the server's bytes stop making sense, as Protocol.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => unavailable(&err),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Connection exceptions (08), shutdown (57P), too many
            // connections (53300), and what Postgres answers when a new
            // connection is refused: the database does not accept
            // connections (55000), does not exist (3D000), or the login
            // fails (28). actionsd's own statements cannot raise the last
            // three, so here they always mean "cannot connect".
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("28")
                    || matches!(code, "53300" | "55000" | "3D000") =>
            {
                unavailable(&err)
            }
            // Serialization failure or deadlock: safe to retry.
            Some("40001" | "40P01") => {
                warn!(error = %err, "transaction conflict");
                conflict()
            }
            _ => internal(&err),
        },
        _ => internal(&err),
    }
}

fn internal(err: &sqlx::Error) -> Error {
    tracing::error!(error = %err, "store failure");
    Error::Internal("store failure".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::checks;

    fn store(pool: &PgPool) -> PgStore {
        PgStore::connect(
            pool.connect_options().as_ref().clone(),
            &PoolSettings {
                max_connections: 8,
                acquire_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(30),
            },
        )
    }

    #[sqlx::test(migrations = "./migrations/postgres")]
    #[cfg_attr(
        not(actionsd_postgres),
        ignore = "the Postgres suite needs DATABASE_URL"
    )]
    async fn a_batch_commits_the_valid_commands_and_reports_the_rest(pool: PgPool) {
        let store = store(&pool);
        checks::a_batch_commits_the_valid_commands_and_reports_the_rest(&store, |commands| {
            commit_batch(pool.clone(), commands)
        })
        .await;
    }

    /// A server that accepts the connection and then answers nonsense (a
    /// proxy cut mid-handshake, a wrong port) fails sqlx with a Protocol
    /// error: the database is unavailable, not an internal failure.
    #[tokio::test]
    async fn a_connection_answering_nonsense_is_unavailable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut request = [0u8; 64];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let options: sqlx::postgres::PgConnectOptions =
            format!("postgres://actionsd@{addr}/actionsd")
                .parse()
                .unwrap();
        let store = PgStore::connect(
            options,
            &PoolSettings {
                max_connections: 1,
                acquire_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(5),
            },
        );
        let err = store.ping().await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        server.abort();
    }

    #[sqlx::test(migrations = "./migrations/postgres")]
    #[cfg_attr(
        not(actionsd_postgres),
        ignore = "the Postgres suite needs DATABASE_URL"
    )]
    async fn concurrent_enqueues_all_land(pool: PgPool) {
        checks::concurrent_enqueues_all_land(Arc::new(store(&pool))).await;
    }
}
