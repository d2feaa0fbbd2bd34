//! The Postgres store.
//!
//! Every accepted change is one transaction that updates the action row
//! (version + 1) and appends an event row. The event feed reads the events
//! table itself; see [`PgStore::read_feed`] for why it cannot skip a row.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tracing::{instrument, warn};

use super::apply;
use super::commit::{Committers, GroupCommit};
use super::rows::{terminal_phases, waiting_condition, FeedRow};
use super::{FeedBatch, FeedCursor, PeerListener, PeerSignal, Store};
use crate::domain::{
    ClaimRequest, Command, Error, HeartbeatOutcome, Lease, LeaseExpiry, Phase, ReapOutcome,
    ReapSettings, CONDITION_TIMEOUT_PHASE,
};

/// The LISTEN/NOTIFY channel daemons wake each other on.
pub const CHANNEL: &str = "actionsd_events";

/// The embedded migrations of the Postgres schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// [`state_columns!`] of the table aliased `a`.
macro_rules! a_state_columns {
    () => {
        "a.org, a.project, a.domain, a.run_name, a.name, a.parent_name, a.version, a.phase, a.attempt, a.output_uri, a.error, a.value, a.queue, a.lease_holder, a.kind, a.run_output_base, a.address"
    };
}

/// Appends the state rows returned by the `changed` CTE to the event log;
/// with a parameter (`"$N"`), it is recorded as who made the change.
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
    ($by:literal) => {
        concat!(
            " INSERT INTO events (",
            state_columns!(),
            ", changed_by) SELECT ",
            state_columns!(),
            ", ",
            $by,
            " FROM changed"
        )
    };
}

mod lease;
mod read;
mod retention;
mod time;
mod tx;

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
    /// Runs one call of the store within the statement timeout.
    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        bounded(self.timeout, call).await
    }

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
            /// A row after the cursor, and whether its transaction is below
            /// the horizon (`settled`): only those may be delivered.
            #[derive(sqlx::FromRow)]
            struct Row {
                settled: bool,
                #[sqlx(flatten)]
                row: FeedRow,
            }
            // One statement: the rows after the cursor in (xid, seq) order,
            // each marked settled or not against the horizon computed once
            // (MATERIALIZED). The settled rows come first, since every xid
            // below the horizon sorts before every xid at or above it; the
            // first unsettled row, if any, says committed events wait
            // behind a running transaction. One row past `limit` tells
            // whether more settled rows follow.
            let fetched: Vec<Row> = sqlx::query_as(concat!(
                "WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x) \
                 SELECT xid < (SELECT x FROM h) AS settled, \
                 xid::text::bigint AS major, seq AS minor, \
                 (extract(epoch FROM created_at) * 1000000)::bigint AS written_micros, ",
                state_columns!(),
                " FROM events WHERE (xid, seq) > ($1::text::xid8, $2)",
                " ORDER BY xid, seq LIMIT $3"
            ))
            .bind(cursor.major.to_string())
            .bind(cursor.minor)
            .bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
            let pending = fetched.iter().any(|r| !r.settled);
            let rows: Vec<FeedRow> = fetched
                .into_iter()
                .take_while(|r| r.settled)
                .map(|r| r.row)
                .collect();
            // `feed_batch` reports `more` when it is handed `limit` rows or
            // more; it is handed the extra settled row only to say so.
            let more = rows.len() > limit;
            let mut batch = super::read::feed_batch(
                cursor,
                rows.into_iter().take(limit).collect(),
                limit,
                pending,
            )?;
            batch.more = more;
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
            trip();
            let mut conn = self.pool.begin().await.map_err(db_error)?;
            let leases = super::lease::claim(&mut tx::PgTx::new(&mut conn), request).await?;
            trip();
            conn.commit().await.map_err(db_error)?;
            Ok(leases)
        })
        .await
    }

    #[instrument(skip_all, fields(executor = %executor))]
    async fn heartbeat(&self, executor: &str, ttl: Duration) -> Result<HeartbeatOutcome, Error> {
        bounded(self.timeout, async move {
            trip();
            let mut conn = self.pool.begin().await.map_err(db_error)?;
            let outcome =
                super::lease::heartbeat(&mut tx::PgTx::new(&mut conn), executor, ttl).await?;
            trip();
            conn.commit().await.map_err(db_error)?;
            Ok(outcome)
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
            // The CASEs are `LeaseExpiry::decide`, row by row.
            let phases: Vec<Phase> = sqlx::query_scalar(&format!(
                concat!(
                    "WITH expired AS (",
                    "  SELECT org, project, domain, run_name, name FROM actions",
                    "  WHERE lease_deadline < now() AND phase NOT IN {terminal} FOR UPDATE SKIP LOCKED",
                    "), changed AS (",
                    "  UPDATE actions a SET",
                    "    phase = CASE WHEN a.attempt <= $1 THEN $3 ELSE $4 END,",
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
                terminal = terminal_phases()
            ))
            .bind(max)
            .bind(settings.lease_error.as_ref())
            .bind(LeaseExpiry::Requeue.phase())
            .bind(LeaseExpiry::Fail.phase())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            // Terminal actions whose lease was never released (their executor
            // vanished before a heartbeat reported the end).
            sqlx::query(&format!(
                "UPDATE actions SET lease_deadline = NULL \
                 WHERE lease_deadline < now() AND phase IN {}",
                terminal_phases()
            ))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            // Conditions nobody signalled in time.
            let timed_out = sqlx::query(&format!(
                concat!(
                "WITH due AS (",
                "  SELECT org, project, domain, run_name, name FROM actions",
                "  WHERE {waiting} AND deadline < now() FOR UPDATE SKIP LOCKED",
                "), changed AS (",
                "  UPDATE actions a SET phase = $2, error = $1, end_time = now(),",
                "    version = a.version + 1, updated_at = now()",
                "  FROM due d",
                "  WHERE (a.org, a.project, a.domain, a.run_name, a.name)",
                "      = (d.org, d.project, d.domain, d.run_name, d.name)",
                "  RETURNING a.*",
                ")",
                insert_events_from_changed!()
                ),
                waiting = waiting_condition()
            ))
            .bind(settings.timeout_error.as_ref())
            .bind(CONDITION_TIMEOUT_PHASE)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            tx.commit().await.map_err(db_error)?;
            Ok(ReapOutcome {
                requeued: phases.iter().filter(|p| **p == LeaseExpiry::Requeue.phase()).count(),
                failed: phases.iter().filter(|p| **p == LeaseExpiry::Fail.phase()).count(),
                timed_out: usize::try_from(timed_out).unwrap_or(usize::MAX),
            })
            })
        .await
    }

    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error> {
        let listener = PgPeerListener::connect(self.options.clone(), self.timeout).await?;
        Ok(Some(Box::new(listener)))
    }
}

housekeeping_of_every_backend!(PgStore);

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

/// Applies `commands` in one transaction (see [`apply::apply_batch`]). A
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
    match transaction(&pool, &commands).await {
        Ok(results) => return results,
        Err(Error::Conflict) if commands.len() > 1 => {
            warn!(
                commands = commands.len(),
                "batch met a concurrent change; applying its commands one by one"
            );
        }
        Err(err) => return commands.iter().map(|_| Err(err.clone())).collect(),
    }
    let mut results = Vec::with_capacity(commands.len());
    for command in commands.chunks(1) {
        results.push(match transaction(&pool, command).await {
            Ok(mut one) => one.pop().unwrap_or(Err(Error::Conflict)),
            Err(err) => Err(err),
        });
    }
    results
}

/// `commands` in one transaction, each command's result resolved after it
/// ended; `Err` when the transaction as a whole failed (nothing
/// committed).
#[instrument(skip_all, fields(commands = commands.len()))]
async fn transaction(
    pool: &PgPool,
    commands: &[Command],
) -> Result<Vec<Result<usize, Error>>, Error> {
    trip();
    let mut conn = pool.begin().await.map_err(db_error)?;
    let applied = apply::apply_batch(&mut tx::PgTx::new(&mut conn), commands).await?;
    trip();
    apply::end_batch(conn, commands, applied, db_error).await
}

/// Counts one statement sent to Postgres (`actionsd_store_round_trips_total`).
fn trip() {
    metrics::counter!(crate::metrics::names::STORE_ROUND_TRIPS, "store" => "postgres").increment(1);
    #[cfg(test)]
    let _ = tests::TRIPS.try_with(|trips| trips.set(trips.get() + 1));
}

fn parse_xid(text: &str) -> Result<i64, Error> {
    text.parse()
        .map_err(|_| Error::Internal(format!("unexpected transaction id {text:?}")))
}

/// Turns a database failure into a domain error, by error class and
/// SQLSTATE only.
fn db_error(err: sqlx::Error) -> Error {
    super::map_db_error(err, |err, db| match db.code().as_deref() {
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
            Some(super::unavailable(err))
        }
        // Serialization failure or deadlock: safe to retry.
        Some("40001" | "40P01") => {
            warn!(error = %err, "transaction conflict");
            Some(Error::Conflict)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::checks;
    use crate::store::Housekeeping;

    tokio::task_local! {
        /// The statements [`trip`] counted in the task that set it.
        pub(super) static TRIPS: std::cell::Cell<u64>;
    }

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

    #[sqlx::test(migrations = "./migrations/postgres")]
    #[cfg_attr(
        not(actionsd_postgres),
        ignore = "the Postgres suite needs DATABASE_URL"
    )]
    async fn a_batch_sees_its_own_writes(pool: PgPool) {
        let store = store(&pool);
        crate::store::conformance::a_batch_sees_its_own_writes(&store, |commands| {
            commit_batch(pool.clone(), commands)
        })
        .await;
    }

    #[sqlx::test(migrations = "./migrations/postgres")]
    #[cfg_attr(
        not(actionsd_postgres),
        ignore = "the Postgres suite needs DATABASE_URL"
    )]
    async fn a_batch_of_refusals_writes_nothing(pool: PgPool) {
        let store = store(&pool);
        crate::store::conformance::a_batch_of_refusals_writes_nothing(&store, |commands| {
            commit_batch(pool.clone(), commands)
        })
        .await;
    }

    /// A batch is applied set-wise: a handful of statements, whatever its
    /// size (transaction, reads, one write per kind of write, commit).
    #[sqlx::test(migrations = "./migrations/postgres")]
    #[cfg_attr(
        not(actionsd_postgres),
        ignore = "the Postgres suite needs DATABASE_URL"
    )]
    async fn a_large_batch_applies_each_command_in_order(pool: PgPool) {
        let store = store(&pool);
        let trips = Arc::new(std::sync::Mutex::new(Vec::new()));
        crate::store::conformance::a_large_batch_applies_each_command_in_order(
            &store,
            |commands| {
                let (pool, trips) = (pool.clone(), trips.clone());
                TRIPS.scope(std::cell::Cell::new(0), async move {
                    let size = commands.len();
                    let results = commit_batch(pool, commands).await;
                    trips
                        .lock()
                        .unwrap()
                        .push((size, TRIPS.with(std::cell::Cell::get)));
                    results
                })
            },
        )
        .await;
        let trips = trips.lock().unwrap().clone();
        assert_eq!(trips.len(), 3);
        for (size, statements) in trips {
            // The last batch reads one row again after a held write.
            assert!(
                statements <= 7,
                "{size} commands took {statements} statements"
            );
        }
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
