//! The embedded SQLite store: one daemon, one database file, no server.
//!
//! The same tables and the same rules as the Postgres store (see
//! `postgres.rs`): every accepted change is one transaction that updates the
//! action row (version + 1) and appends an event row. What differs follows
//! from SQLite running one write transaction at a time:
//! - every command begins with `BEGIN IMMEDIATE`, which takes the write lock
//!   up front, so no row locks (`FOR UPDATE`, `FOR SHARE`) are needed and no
//!   concurrent change can slip in between a check and a write;
//! - the event feed reads by sequence number alone (see
//!   [`SqliteStore::read_feed`]);
//! - there are no peers: an advisory lock on `<file>.lock` keeps a second
//!   daemon away from the file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};
use tracing::{instrument, warn};

use super::commit::{Committers, GroupCommit};
use super::{read_bounded, snapshot_page, FeedBatch, FeedCursor, PeerListener, Store};
use crate::domain::{
    decide_enqueue_existing, decide_finish, decide_signal, decide_update, output_uri, AbortAction,
    ActionId, ActionKind, ActionState, Cancellation, ClaimRequest, Command, Current, EnqueueAction,
    Error, FinishAction, HeartbeatOutcome, Lease, Page, Phase, ReapOutcome, ReapSettings, RunId,
    SignalAction, SnapshotPosition, UpdateStatus,
};
use crate::schema;

/// The embedded migrations of the SQLite schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The columns of an action's observable state, in [`state_from_row`] order.
macro_rules! state_columns {
    () => {
        "org, project, domain, run_name, name, parent_name, version, phase, attempt, output_uri, error, value, queue, lease_holder, kind, run_output_base, address"
    };
}

const TERMINAL_PHASES: &str = "(5, 6, 7, 8, 10)";

mod read;
mod retention;

/// SQLite primary result codes (the low byte of an extended result code).
mod code {
    pub const BUSY: i32 = 5;
    pub const LOCKED: i32 = 6;
    pub const IOERR: i32 = 10;
    pub const FULL: i32 = 13;
    pub const CANTOPEN: i32 = 14;
    pub const PROTOCOL: i32 = 15;
}

/// Settings for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteSettings {
    /// Connections in the pool. Reads run in parallel (WAL); writes take
    /// turns whatever this is.
    pub max_connections: u32,
    /// How long a call waits for a pooled connection.
    pub acquire_timeout: Duration,
    /// How long a statement waits for a lock held by another connection
    /// before failing with UNAVAILABLE.
    pub busy_timeout: Duration,
    /// Most commands committed together in one transaction (one sync of
    /// the log); see [`GroupCommit`].
    pub max_batch: usize,
}

impl Default for SqliteSettings {
    fn default() -> Self {
        Self {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            max_batch: GroupCommit::default().max_batch,
        }
    }
}

/// Why [`SqliteStore::open`] failed. Each variant names the file; the
/// cause, when there is one, is its `source`.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the directory {} does not exist", path.display())]
    MissingDir { path: PathBuf },

    #[error("cannot lock {}", path.display())]
    LockFile { path: PathBuf, source: io::Error },

    #[error(
        "another actionsd is using {}; SQLite allows one daemon per file — use Postgres to run several",
        path.display()
    )]
    Locked { path: PathBuf },

    #[error("cannot open the SQLite database {}", path.display())]
    Open { path: PathBuf, source: sqlx::Error },

    #[error("cannot apply migrations to {}", path.display())]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
}

pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// Queues this daemon's writers in order. SQLite would serialise them
    /// anyway (`BEGIN IMMEDIATE` waits in its busy handler, which polls);
    /// waiting here instead is fair and wakes the next writer at once.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Commands wait here to share a transaction; started on the first
    /// write, on the runtime that makes it.
    committers: OnceLock<Committers>,
    max_batch: usize,
    /// The open `<path>.lock`, locked exclusively while the store is open.
    /// The lock belongs to the open file: closing it releases the lock.
    lock: Mutex<Option<fd_lock::RwLock<File>>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and applies
    /// pending migrations. Fails if another process, or another store in
    /// this process, has the file open.
    pub async fn open(path: &Path, settings: &SqliteSettings) -> Result<Self, OpenError> {
        // Only the file is created: a directory that does not exist is
        // more likely a typo in the path than a wish for new directories.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(OpenError::MissingDir {
                    path: dir.to_owned(),
                });
            }
        }
        let lock = lock_file(path)?;

        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: the write-ahead log is synced on every commit, so an
            // acknowledged write survives kill -9 and power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(settings.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        if let Err(source) = MIGRATOR.run(&pool).await {
            pool.close().await;
            return Err(OpenError::Migrate {
                path: path.to_owned(),
                source,
            });
        }
        Ok(Self {
            pool,
            path: path.to_owned(),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            committers: OnceLock::new(),
            max_batch: settings.max_batch,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// Where the database lives when no path is configured:
    /// `<per-user data directory>/actionsd/actionsd.db`.
    pub fn default_path() -> Option<PathBuf> {
        dirs::data_local_dir().map(|dir| dir.join("actionsd").join("actionsd.db"))
    }

    /// Checks, without changing it, that the database at `path` has every
    /// built-in migration applied and no unknown one.
    pub async fn check_migrations(path: &Path) -> Result<(), String> {
        if !path.exists() {
            return Err(format!(
                "{} does not exist: every migration is pending (run `actionsd migrate`)",
                path.display()
            ));
        }
        let options = SqliteConnectOptions::new().filename(path).read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let applied: Result<Vec<i64>, _> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&pool)
        .await;
        pool.close().await;
        let applied = applied.unwrap_or_default();
        super::check_applied(&applied, &MIGRATOR)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// The path of the lock file that guards `path`.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Opens `<path>.lock` and locks it exclusively, without waiting.
fn lock_file(path: &Path) -> Result<fd_lock::RwLock<File>, OpenError> {
    let lock_path = lock_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|source| OpenError::LockFile {
            path: lock_path.clone(),
            source,
        })?;
    let mut lock = fd_lock::RwLock::new(file);
    match lock.try_write() {
        // The guard would unlock when dropped; the lock must instead last
        // as long as the store, so it is kept by the open file and ends
        // when the file is closed (at `close` or drop).
        Ok(guard) => std::mem::forget(guard),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
            return Err(OpenError::Locked {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(OpenError::LockFile {
                path: lock_path,
                source,
            })
        }
    }
    Ok(lock)
}

#[async_trait]
impl Store for SqliteStore {
    #[instrument(skip_all, fields(action = %command.action_id()))]
    async fn execute(&self, command: Command) -> Result<usize, Error> {
        let committers = self.committers.get_or_init(|| {
            let pool = self.pool.clone();
            let writer = self.writer.clone();
            // SQLite has one writer: one committer, whose batches share a
            // sync of the log.
            Committers::spawn(
                GroupCommit {
                    committers: 1,
                    max_batch: self.max_batch,
                },
                Arc::new(move |commands| {
                    Box::pin(commit_batch(pool.clone(), writer.clone(), commands))
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
        let rows = sqlx::query(concat!(
            "SELECT ",
            state_columns!(),
            ", created_at FROM actions",
            " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4",
            " AND ((NOT ?6 AND name = ?5) OR (parent_name = ?5",
            "   AND (?7 IS NULL OR (created_at, name) > (?7, ?8))))",
            " ORDER BY name = ?5 DESC, created_at, name LIMIT ?9"
        ))
        .bind_id(parent)
        .bind(after.is_some())
        .bind(after.map(|a| a.created_at.timestamp_micros()))
        .bind(after.map(|a| a.name.as_str()))
        .bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
        .fetch(&self.pool);
        let rows = read_bounded(
            rows,
            |row| {
                let state = state_from_row(row)?;
                let position = SnapshotPosition {
                    created_at: time_from_micros(row.try_get("created_at").map_err(db_error)?)?,
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
    }

    async fn feed_start(&self) -> Result<FeedCursor, Error> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(FeedCursor {
            major: 0,
            minor: last,
        })
    }

    /// Reads events in `seq` order after `cursor.minor` (`major` is unused
    /// and always 0).
    ///
    /// Postgres hands out sequence numbers at insert time and commits
    /// transactions in any order, so its feed must also wait for older
    /// transactions (the xid horizon). SQLite runs one write transaction at
    /// a time, from `BEGIN IMMEDIATE` to commit: a transaction takes its
    /// sequence numbers only after the previous one has committed, so `seq`
    /// order is commit order. A reader sees a prefix of that order, and
    /// reading `seq > cursor` never skips a row. Nothing is ever pending.
    async fn read_feed(&self, cursor: FeedCursor, limit: usize) -> Result<FeedBatch, Error> {
        let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(concat!(
            "SELECT seq, created_at, ",
            state_columns!(),
            " FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .bind(cursor.minor)
        .bind(limit_i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;

        let mut batch = FeedBatch {
            cursor,
            more: rows.len() >= limit,
            pending: false,
            events: Vec::with_capacity(rows.len()),
            written_micros: Vec::with_capacity(rows.len()),
        };
        for row in &rows {
            batch.cursor = FeedCursor {
                major: 0,
                minor: row.try_get("seq").map_err(db_error)?,
            };
            batch.events.push(state_from_row(row)?);
            batch
                .written_micros
                .push(row.try_get("created_at").map_err(db_error)?);
        }
        Ok(batch)
    }

    /// There are no peers: the file lock admits one daemon per file.
    async fn notify_peers(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error> {
        Ok(None)
    }

    #[instrument(skip_all, fields(executor = %request.executor, queue = %request.queue))]
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Lease>, Error> {
        let _writer = self.writer.lock().await;
        // The write lock serialises claimers (here and in any other
        // connection): an attempt is leased once and every count below
        // stays true until the commit, without row locks.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let now = now_micros();
        let (held, waiting): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), coalesce(sum(?2 AND EXISTS ( \
               SELECT 1 FROM actions c \
               WHERE c.org = a.org AND c.project = a.project AND c.domain = a.domain \
                 AND c.run_name = a.run_name AND c.parent_name = a.name \
                 AND c.phase NOT IN {TERMINAL_PHASES})), 0) \
             FROM actions a WHERE a.lease_holder = ?1 AND a.lease_deadline IS NOT NULL \
             AND a.phase NOT IN {TERMINAL_PHASES}"
        ))
        .bind(&request.executor)
        .bind(request.max_leases > 0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let free = usize::try_from(super::free_leases(request, held, waiting)).unwrap_or(0);
        let mut leases = Vec::new();
        if free == 0 {
            tx.commit().await.map_err(db_error)?;
            return Ok(leases);
        }
        let deadline = now.saturating_add(micros(request.lease_ttl));
        let deadline_time = time_from_micros(deadline)?;
        let page = i64::try_from(free.saturating_mul(2).saturating_add(16)).unwrap_or(i64::MAX);
        // The runs met so far: their RunSpec and how many more actions they
        // may lease (`None`: unlimited). Only this transaction changes
        // leases until it commits, so the counts stay exact.
        let mut runs: HashMap<RunId, (Bytes, Option<i64>)> = HashMap::new();
        // Oldest first. Claimed candidates leave the queue; those skipped
        // because their run is at its limit stay, so pages go on after the
        // last candidate seen.
        let mut after: Option<(i64, ActionId)> = None;
        'pages: loop {
            let candidates = sqlx::query(
                "SELECT org, project, domain, run_name, name, created_at FROM actions \
                 WHERE queue = ?1 AND phase = 1 AND kind = 1 \
                   AND (?2 IS NULL \
                     OR (created_at, name, org, project, domain, run_name) > (?2, ?3, ?4, ?5, ?6, ?7)) \
                 ORDER BY created_at, name, org, project, domain, run_name LIMIT ?8",
            )
            .bind(&request.queue)
            .bind(after.as_ref().map(|(created, _)| *created))
            .bind(after.as_ref().map(|(_, id)| id.name.as_str()))
            .bind(after.as_ref().map(|(_, id)| id.run.org.as_str()))
            .bind(after.as_ref().map(|(_, id)| id.run.project.as_str()))
            .bind(after.as_ref().map(|(_, id)| id.run.domain.as_str()))
            .bind(after.as_ref().map(|(_, id)| id.run.name.as_str()))
            .bind(page)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            let last_page = i64::try_from(candidates.len()).unwrap_or(i64::MAX) < page;
            for candidate in &candidates {
                if leases.len() >= free {
                    break 'pages;
                }
                let id = action_id_from_row(candidate)?;
                after = Some((
                    candidate.try_get("created_at").map_err(db_error)?,
                    id.clone(),
                ));
                if !runs.contains_key(&id.run) {
                    let run = read_run_room(&mut tx, &id.run).await?;
                    runs.insert(id.run.clone(), run);
                }
                let Some((run_spec, room)) = runs.get_mut(&id.run) else {
                    continue;
                };
                if let Some(room) = room {
                    if *room <= 0 {
                        continue;
                    }
                    *room -= 1;
                }
                let run_spec = run_spec.clone();
                let row = sqlx::query(concat!(
                    "UPDATE actions SET phase = 3, lease_holder = ?6, lease_deadline = ?7,",
                    "   version = version + 1, updated_at = ?8",
                    " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
                    " RETURNING ",
                    state_columns!(),
                    ", spec"
                ))
                .bind_id(&id)
                .bind(&request.executor)
                .bind(deadline)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
                let state = state_from_row(&row)?;
                append_event(&mut tx, &state, now).await?;
                leases.push(Lease {
                    output_uri: state.output_uri.clone(),
                    id,
                    spec: Bytes::from(row.try_get::<Vec<u8>, _>("spec").map_err(db_error)?),
                    run_spec,
                    attempt: state.attempt,
                    deadline: deadline_time,
                });
            }
            if last_page || leases.len() >= free {
                break;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(leases)
    }

    #[instrument(skip_all, fields(executor = %executor))]
    async fn leases_of(&self, executor: &str) -> Result<Vec<Lease>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.spec, a.attempt, \
                    a.lease_deadline, a.run_output_base, r.run_spec \
             FROM actions a JOIN runs r \
               ON r.org = a.org AND r.project = a.project AND r.domain = a.domain \
              AND r.name = a.run_name \
             WHERE a.lease_holder = ?1 AND a.lease_deadline IS NOT NULL \
               AND a.phase NOT IN {TERMINAL_PHASES} \
             ORDER BY a.created_at, a.name"
        ))
        .bind(executor)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let id = action_id_from_row(row)?;
                let attempt = attempt_from_db(row.try_get("attempt").map_err(db_error)?)?;
                let base: String = row.try_get("run_output_base").map_err(db_error)?;
                Ok(Lease {
                    output_uri: output_uri(ActionKind::Task, "", &base, &id.name, attempt),
                    id,
                    spec: Bytes::from(row.try_get::<Vec<u8>, _>("spec").map_err(db_error)?),
                    run_spec: Bytes::from(row.try_get::<Vec<u8>, _>("run_spec").map_err(db_error)?),
                    attempt,
                    deadline: time_from_micros(row.try_get("lease_deadline").map_err(db_error)?)?,
                })
            })
            .collect()
    }

    async fn heartbeat(&self, executor: &str, ttl: Duration) -> Result<HeartbeatOutcome, Error> {
        let _writer = self.writer.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let now = now_micros();
        // Leases whose action ended: released, so each is reported once.
        let released = sqlx::query(&format!(
            "UPDATE actions SET lease_deadline = NULL \
             WHERE lease_holder = ?1 AND lease_deadline IS NOT NULL AND phase IN {TERMINAL_PHASES} \
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
        let deadline = now.saturating_add(micros(ttl));
        sqlx::query(&format!(
            "UPDATE actions SET lease_deadline = ?2 \
             WHERE lease_holder = ?1 AND lease_deadline IS NOT NULL AND phase NOT IN {TERMINAL_PHASES}"
        ))
        .bind(executor)
        .bind(deadline)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(HeartbeatOutcome {
            deadline: time_from_micros(deadline)?,
            cancelled,
        })
    }

    async fn reap(&self, settings: &ReapSettings) -> Result<ReapOutcome, Error> {
        let _writer = self.writer.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let now = now_micros();
        // Expired leases: requeue with the next attempt while retries are
        // left, else fail with a SYSTEM error. The CASEs read the row as it
        // was before this UPDATE.
        let expired = sqlx::query(&format!(
            concat!(
                "UPDATE actions SET",
                "   phase = CASE WHEN attempt <= ?1 THEN 1 ELSE 6 END,",
                "   attempt = CASE WHEN attempt <= ?1 THEN attempt + 1 ELSE attempt END,",
                "   error = CASE WHEN attempt <= ?1 THEN error ELSE ?2 END,",
                "   end_time = CASE WHEN attempt <= ?1 THEN end_time ELSE ?3 END,",
                "   lease_holder = NULL, lease_deadline = NULL,",
                "   version = version + 1, updated_at = ?3",
                " WHERE lease_deadline < ?3 AND phase NOT IN {terminal}",
                " RETURNING ",
                state_columns!()
            ),
            terminal = TERMINAL_PHASES
        ))
        .bind(i64::from(settings.max_system_retries))
        .bind(settings.lease_error.as_ref())
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let mut outcome = ReapOutcome::default();
        for row in &expired {
            let state = state_from_row(row)?;
            if state.phase == Phase::Queued {
                outcome.requeued += 1;
            } else {
                outcome.failed += 1;
            }
            append_event(&mut tx, &state, now).await?;
        }
        // Terminal actions whose lease was never released (their executor
        // vanished before a heartbeat reported the end).
        sqlx::query(&format!(
            "UPDATE actions SET lease_deadline = NULL \
             WHERE lease_deadline < ?1 AND phase IN {TERMINAL_PHASES}"
        ))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        // Conditions nobody signalled in time.
        let due = sqlx::query(concat!(
            "UPDATE actions SET phase = 8, error = ?1, end_time = ?2,",
            "   version = version + 1, updated_at = ?2",
            " WHERE kind = 3 AND phase = 9 AND deadline < ?2",
            " RETURNING ",
            state_columns!()
        ))
        .bind(settings.timeout_error.as_ref())
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        for row in &due {
            append_event(&mut tx, &state_from_row(row)?, now).await?;
        }
        outcome.timed_out = due.len();
        tx.commit().await.map_err(db_error)?;
        Ok(outcome)
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
             WHERE phase = 1 AND kind = 1 GROUP BY queue ORDER BY count(*) DESC LIMIT ?1",
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
                oldest: time_from_micros(row.get::<i64, _>(2))?,
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
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Closes every connection, then releases the file lock, so another
    /// daemon may open the file.
    async fn close(&self) {
        if let Some(committers) = self.committers.get() {
            committers.close().await;
        }
        self.pool.close().await;
        self.lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// Binds an action's key columns (org, project, domain, run name, name),
/// in that order, to the next five parameters.
trait BindId<'q> {
    fn bind_id(self, id: &'q ActionId) -> Self;
}

impl<'q> BindId<'q> for sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    fn bind_id(self, id: &'q ActionId) -> Self {
        self.bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(&id.name)
    }
}

/// Applies `commands` in one transaction, each within a savepoint: a
/// command that fails is rolled back to its savepoint and reports its
/// error, and the others commit. A failed commit (or a failure that ends
/// the transaction, such as a full disk) fails every command.
async fn commit_batch(
    pool: SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
    commands: Vec<Command>,
) -> Vec<Result<usize, Error>> {
    let _writer = writer.lock().await;
    match apply_batch(&pool, &commands).await {
        Ok(results) => results,
        Err(err) => commands.iter().map(|_| Err(err.clone())).collect(),
    }
}

#[instrument(skip_all, fields(commands = commands.len()))]
async fn apply_batch(
    pool: &SqlitePool,
    commands: &[Command],
) -> Result<Vec<Result<usize, Error>>, Error> {
    // IMMEDIATE takes the write lock now, not at the first write: a
    // transaction that read first and then tried to write would fail
    // (SQLITE_BUSY) instead of waiting if another writer got in between.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    // One time for the whole transaction, as Postgres's now().
    let now = now_micros();
    let mut results = Vec::with_capacity(commands.len());
    if let [command] = commands {
        // Alone in its transaction: its failure rolls the transaction back.
        results.push(apply(&mut tx, command, now).await);
    } else {
        for (index, command) in commands.iter().enumerate() {
            let savepoint = if index == 0 {
                "SAVEPOINT command"
            } else {
                "RELEASE SAVEPOINT command; SAVEPOINT command"
            };
            sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(savepoint))
                .await
                .map_err(db_error)?;
            let result = apply(&mut tx, command, now).await;
            if result.is_err() {
                sqlx::Executor::execute(&mut *tx, sqlx::raw_sql("ROLLBACK TO SAVEPOINT command"))
                    .await
                    .map_err(db_error)?;
            }
            results.push(result);
        }
    }
    if results.iter().all(Result::is_err) {
        tx.rollback().await.map_err(db_error)?;
    } else {
        tx.commit().await.map_err(db_error)?;
    }
    Ok(results)
}

async fn apply(conn: &mut SqliteConnection, command: &Command, now: i64) -> Result<usize, Error> {
    match command {
        Command::Enqueue(c) => enqueue(conn, c, now).await,
        Command::Update(c) => update(conn, c, now).await,
        Command::Abort(c) => abort(conn, c, now).await,
        Command::Signal(c) => signal(conn, c, now).await,
        Command::Finish(c) => finish(conn, c, now).await,
    }
}

async fn enqueue(
    conn: &mut SqliteConnection,
    action: &EnqueueAction,
    now: i64,
) -> Result<usize, Error> {
    if let Some(result) = compare_existing(conn, action).await? {
        return result.map(|()| 0);
    }
    let id = &action.id;
    let run_queue = match &action.parent {
        None => {
            let run = action.run.clone().unwrap_or_default();
            let inserted = sqlx::query(
                "INSERT INTO runs (org, project, domain, name, root_name, run_spec, queue, \
                   max_action_concurrency, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (org, project, domain, name) DO NOTHING",
            )
            .bind_id(id)
            .bind(run.run_spec.as_ref())
            .bind(&run.queue)
            .bind(i32::try_from(run.max_action_concurrency).unwrap_or(i32::MAX))
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?
            .rows_affected();
            if inserted == 0 {
                // The run has another root: this action does not exist (the
                // comparison above), and no other writer has run since.
                let root: String = sqlx::query_scalar(
                    "SELECT root_name FROM runs WHERE org = ?1 AND project = ?2 AND domain = ?3 AND name = ?4",
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
            // No FOR SHARE: this transaction holds the write lock, so an
            // Abort of the parent runs wholly before or after it, and its
            // cascade then sees the new child.
            let row = sqlx::query(
                "SELECT a.phase, r.queue FROM actions a JOIN runs r \
                   ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
                 WHERE a.org = ?1 AND a.project = ?2 AND a.domain = ?3 AND a.run_name = ?4 AND a.name = ?5",
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
    let deadline = action
        .condition_timeout
        .map(|timeout| now.saturating_add(i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX)));

    let row = sqlx::query(concat!(
        "INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,",
        "   output_uri, condition_type, deadline, created_at, updated_at, run_output_base)",
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15)",
        " ON CONFLICT (org, project, domain, run_name, name) DO NOTHING",
        " RETURNING ",
        state_columns!()
    ))
    .bind_id(id)
    .bind(&action.parent)
    .bind(action.kind as i16)
    .bind(action.phase as i16)
    .bind(action.spec.as_ref())
    .bind(&queue)
    .bind(&action.output_uri)
    .bind(action.condition_type)
    .bind(deadline)
    .bind(now)
    .bind(&action.run_output_base)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|err| match constraint(&err) {
        // Cannot happen while writers are serialised (the checks above
        // ran in this transaction); mapped for what they would mean.
        Some(sqlx::error::ErrorKind::ForeignKeyViolation) => match &action.parent {
            Some(parent) => Error::ParentNotFound(id.sibling(parent.clone())),
            None => db_error(err),
        },
        Some(sqlx::error::ErrorKind::UniqueViolation) => {
            Error::AlreadyExists(format!("action {id} already exists"))
        }
        _ => db_error(err),
    })?;
    let Some(row) = row else {
        // Not reachable either: the comparison above found no such action.
        return match compare_existing(conn, action).await? {
            Some(result) => result.map(|()| 0),
            None => Err(Error::Internal(format!(
                "action {id} neither inserted nor found"
            ))),
        };
    };
    append_event(conn, &state_from_row(&row)?, now).await?;
    Ok(1)
}

/// `Some(Ok)` when the action exists with the same content, `Some(Err)`
/// when it exists with different content, `None` when it does not exist.
async fn compare_existing(
    conn: &mut SqliteConnection,
    action: &EnqueueAction,
) -> Result<Option<Result<(), Error>>, Error> {
    let id = &action.id;
    let row = sqlx::query(
        "SELECT a.spec, r.run_spec, r.root_name = a.name AS is_root FROM actions a JOIN runs r \
           ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
         WHERE a.org = ?1 AND a.project = ?2 AND a.domain = ?3 AND a.run_name = ?4 AND a.name = ?5",
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
    let is_root = row.try_get::<i64, _>("is_root").map_err(db_error)? != 0;
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

/// Reads what the rules need. No row lock: the transaction holds the
/// database's write lock, so the row cannot change until it commits.
async fn read_current(conn: &mut SqliteConnection, id: &ActionId) -> Result<Current, Error> {
    let row = sqlx::query(
        "SELECT kind, phase, attempt, parent_name, condition_type, value, lease_holder, \
                run_output_base, address FROM actions \
         WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
    )
    .bind_id(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?
    .ok_or_else(|| Error::ActionNotFound(id.clone()))?;
    let kind: i64 = row.try_get("kind").map_err(db_error)?;
    Ok(Current {
        kind: i16::try_from(kind)
            .ok()
            .and_then(ActionKind::from_db)
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

async fn update(
    conn: &mut SqliteConnection,
    update: &UpdateStatus,
    now: i64,
) -> Result<usize, Error> {
    let id = &update.id;
    let current = read_current(conn, id).await?;
    let Some(next) = decide_update(id, &current, update)? else {
        return Ok(0);
    };
    let row = sqlx::query(concat!(
        "UPDATE actions SET phase = ?6, attempt = ?7, version = version + 1, updated_at = ?11,",
        "   start_time = COALESCE(?8, start_time),",
        "   end_time = CASE WHEN ?9 THEN COALESCE(?10, end_time, ?11) ELSE end_time END,",
        "   address = COALESCE(?12, address)",
        " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        " RETURNING ",
        state_columns!()
    ))
    .bind_id(id)
    .bind(next.phase as i16)
    .bind(i64::from(next.attempt))
    .bind(update.start_time.as_ref().map(DateTime::timestamp_micros))
    .bind(next.phase.is_terminal())
    .bind(update.end_time.as_ref().map(DateTime::timestamp_micros))
    .bind(now)
    .bind(update.address.as_deref())
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    append_event(conn, &state_from_row(&row)?, now).await?;
    Ok(1)
}

async fn abort(conn: &mut SqliteConnection, abort: &AbortAction, now: i64) -> Result<usize, Error> {
    let id = &abort.id;
    let current = read_current(conn, id).await?;
    if current.phase.is_terminal() {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is already {}",
            current.phase
        )));
    }
    // Walks the whole subtree (terminal actions keep their phase, but their
    // descendants are still aborted). One pass is enough: this transaction
    // holds the write lock, so no child can be enqueued meanwhile.
    let cascade = format!(
        concat!(
            "WITH RECURSIVE subtree(name) AS (",
            "  SELECT ?5",
            "  UNION SELECT a.name FROM actions a JOIN subtree s ON a.parent_name = s.name",
            "  WHERE a.org = ?1 AND a.project = ?2 AND a.domain = ?3 AND a.run_name = ?4",
            ")",
            " UPDATE actions SET phase = 7, version = version + 1, updated_at = ?9,",
            "   end_time = ?9, abort_reason = ?6, aborted_by = ?7, error = ?8",
            " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4",
            "   AND name IN (SELECT name FROM subtree) AND phase NOT IN {terminal}",
            " RETURNING ",
            state_columns!()
        ),
        terminal = TERMINAL_PHASES
    );
    let rows = sqlx::query(&cascade)
        .bind_id(id)
        .bind(&abort.reason)
        .bind(abort.aborted_by.as_deref())
        .bind(abort.error.as_ref())
        .bind(now)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
    for row in &rows {
        append_event(conn, &state_from_row(row)?, now).await?;
    }
    Ok(rows.len())
}

async fn signal(
    conn: &mut SqliteConnection,
    signal: &SignalAction,
    now: i64,
) -> Result<usize, Error> {
    let id = &signal.id;
    let current = read_current(conn, id).await?;
    if !decide_signal(id, &current, signal)? {
        return Ok(0);
    }
    let row = sqlx::query(concat!(
        "UPDATE actions SET phase = 5, value = ?6, signalled_by = ?7, version = version + 1,",
        "   updated_at = ?8, end_time = ?8",
        " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        " RETURNING ",
        state_columns!()
    ))
    .bind_id(id)
    .bind(signal.value.literal.as_ref())
    .bind(signal.signalled_by.as_deref())
    .bind(now)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    append_event(conn, &state_from_row(&row)?, now).await?;
    Ok(1)
}

/// A run's RunSpec and how many more of its actions may be leased (`None`:
/// no `max_action_concurrency`), counting its live leases.
async fn read_run_room(
    conn: &mut SqliteConnection,
    run: &RunId,
) -> Result<(Bytes, Option<i64>), Error> {
    let row = sqlx::query(&format!(
        "SELECT r.run_spec, r.max_action_concurrency, \
           (SELECT count(*) FROM actions a \
            WHERE a.org = r.org AND a.project = r.project AND a.domain = r.domain \
              AND a.run_name = r.name AND a.lease_deadline IS NOT NULL \
              AND a.phase NOT IN {TERMINAL_PHASES}) AS leased \
         FROM runs r WHERE r.org = ?1 AND r.project = ?2 AND r.domain = ?3 AND r.name = ?4"
    ))
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let limit: i64 = row.try_get("max_action_concurrency").map_err(db_error)?;
    let leased: i64 = row.try_get("leased").map_err(db_error)?;
    Ok((
        Bytes::from(row.try_get::<Vec<u8>, _>("run_spec").map_err(db_error)?),
        (limit > 0).then(|| limit - leased),
    ))
}

async fn finish(
    conn: &mut SqliteConnection,
    finish: &FinishAction,
    now: i64,
) -> Result<usize, Error> {
    let id = &finish.id;
    let current = read_current(conn, id).await?;
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
    let row = if finish.retry {
        // A retrying Finish: the next attempt is queued, as after a lost
        // lease; the error stays for watchers until that attempt reports.
        sqlx::query(concat!(
            "UPDATE actions SET phase = 1, attempt = attempt + 1, error = ?6,",
            "   lease_holder = NULL, lease_deadline = NULL,",
            "   version = version + 1, updated_at = ?7",
            " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
            " RETURNING ",
            state_columns!()
        ))
        .bind_id(id)
        .bind(finish.error.as_deref())
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?
    } else {
        sqlx::query(concat!(
            "UPDATE actions SET phase = ?6, output_uri = ?7, error = ?8, lease_deadline = NULL,",
            "   end_time = ?9, version = version + 1, updated_at = ?9",
            " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
            " RETURNING ",
            state_columns!()
        ))
        .bind_id(id)
        .bind(finish.phase as i16)
        .bind(&output_uri)
        .bind(finish.error.as_deref())
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?
    };
    append_event(conn, &state_from_row(&row)?, now).await?;
    Ok(1)
}

fn action_id_from_row(row: &SqliteRow) -> Result<ActionId, Error> {
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

/// Appends the state a change produced to the event log, in the change's
/// transaction: a copy of the action's row as the change left it.
async fn append_event(
    conn: &mut SqliteConnection,
    state: &ActionState,
    now: i64,
) -> Result<(), Error> {
    let id = &state.id;
    sqlx::query(concat!(
        "INSERT INTO events (",
        state_columns!(),
        ", created_at) SELECT ",
        state_columns!(),
        ", ?6 FROM actions",
        " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5"
    ))
    .bind_id(id)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// An action's observable state from a row of [`state_columns!`] (of
/// `actions` or of `events`).
fn state_from_row(row: &SqliteRow) -> Result<ActionState, Error> {
    let id = action_id_from_row(row)?;
    let attempt = attempt_from_db(row.try_get("attempt").map_err(db_error)?)?;
    // Events written before they carried the kind hold 0: no default.
    let kind = i16::try_from(row.try_get::<i64, _>("kind").map_err(db_error)?)
        .ok()
        .and_then(ActionKind::from_db);
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

fn phase_from_db(value: i64) -> Result<Phase, Error> {
    i32::try_from(value)
        .ok()
        .and_then(Phase::from_wire)
        .ok_or_else(|| Error::Internal(format!("unknown phase {value} in the store")))
}

/// Now, as stored: microseconds since the Unix epoch, UTC.
fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// A duration in stored units (microseconds), saturating.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A stored time (microseconds since the Unix epoch) as a UTC time.
fn time_from_micros(micros: i64) -> Result<DateTime<Utc>, Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| Error::Internal(format!("time {micros} out of range")))
}

/// The kind of a constraint violation, if `err` is one.
fn constraint(err: &sqlx::Error) -> Option<sqlx::error::ErrorKind> {
    match err {
        sqlx::Error::Database(db) => match db.kind() {
            sqlx::error::ErrorKind::Other => None,
            kind => Some(kind),
        },
        _ => None,
    }
}

/// The primary result code of a SQLite error (sqlx reports the extended
/// code, whose low byte is the primary one).
fn primary_code(db: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    db.code()?.parse::<i32>().ok().map(|code| code & 0xff)
}

/// Turns a database failure into a domain error, by error class and SQLite
/// result code only. The cause is logged here; clients see a short message.
fn db_error(err: sqlx::Error) -> Error {
    let unavailable = |err: &sqlx::Error| {
        warn!(error = %err, "database unavailable");
        Error::Unavailable("database unavailable; retry later".to_owned())
    };
    match &err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => unavailable(&err),
        sqlx::Error::Database(db) => match primary_code(db.as_ref()) {
            // Another connection holds a lock past the busy timeout.
            Some(code::BUSY | code::LOCKED) => {
                warn!(error = %err, "database busy");
                Error::Unavailable("database busy; retry".to_owned())
            }
            // The file cannot be read, written or synced (disk full, I/O
            // error, file gone, lock protocol race): the change was rolled
            // back and may succeed later.
            Some(code::IOERR | code::FULL | code::CANTOPEN | code::PROTOCOL) => unavailable(&err),
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
    use prost::Message;

    use super::*;
    use crate::domain::{Event, RunSettings, SignalValue, SimpleKind};
    use crate::proto::flyteidl2::actions;

    fn run_id() -> RunId {
        RunId {
            org: String::new(),
            project: "p".to_owned(),
            domain: "d".to_owned(),
            name: "r1".to_owned(),
        }
    }

    fn id(name: &str) -> ActionId {
        ActionId::new(run_id(), name)
    }

    /// A valid encoded Action; `input_uri` makes contents differ.
    fn spec(name: &str, input_uri: &str) -> Bytes {
        Bytes::from(
            actions::Action {
                input_uri: input_uri.to_owned(),
                run_output_base: format!("s3://b/{name}"),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    fn task(name: &str, parent: Option<&str>) -> EnqueueAction {
        EnqueueAction {
            id: id(name),
            parent: parent.map(str::to_owned),
            kind: ActionKind::Task,
            spec: spec(name, "s3://b/in"),
            run: parent.is_none().then(|| RunSettings {
                run_spec: Bytes::new(),
                queue: Some("gpu".to_owned()),
                max_action_concurrency: 0,
            }),
            task_queue: None,
            phase: Phase::Queued,
            output_uri: String::new(),
            run_output_base: "s3://b/r1/".to_owned(),
            condition_type: None,
            condition_timeout: None,
        }
    }

    fn condition(name: &str, parent: &str) -> EnqueueAction {
        EnqueueAction {
            kind: ActionKind::Condition,
            phase: Phase::Paused,
            condition_type: Some(SimpleKind::Boolean as i32),
            condition_timeout: Some(Duration::from_secs(60)),
            ..task(name, Some(parent))
        }
    }

    fn update(name: &str, attempt: u32, phase: Phase) -> Command {
        Command::Update(UpdateStatus {
            id: id(name),
            attempt,
            phase,
            start_time: None,
            end_time: None,
            address: None,
        })
    }

    fn signal(name: &str, parent: &str, literal: &'static [u8]) -> Command {
        Command::Signal(SignalAction {
            id: id(name),
            parent: parent.to_owned(),
            value: SignalValue {
                kind: SimpleKind::Boolean,
                literal: Bytes::from_static(literal),
            },
            signalled_by: None,
        })
    }

    fn abort(name: &str) -> Command {
        Command::Abort(AbortAction {
            id: id(name),
            reason: "stop".to_owned(),
            aborted_by: Some(Bytes::from_static(b"who")),
            error: Bytes::from_static(b"aborted-error"),
        })
    }

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("actionsd.db"), &settings())
            .await
            .expect("open")
    }

    #[tokio::test]
    async fn a_batch_commits_the_valid_commands_and_reports_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.pool().clone();
        let writer = store.writer.clone();
        crate::store::commit::checks::a_batch_commits_the_valid_commands_and_reports_the_rest(
            &store,
            |commands| commit_batch(pool.clone(), writer.clone(), commands),
        )
        .await;
    }

    #[tokio::test]
    async fn concurrent_enqueues_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(open(&dir).await);
        crate::store::commit::checks::concurrent_enqueues_all_land(store).await;
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let typo = dir
            .path()
            .join("no-such-dir")
            .join("sub")
            .join("actionsd.db");
        let Err(err) = SqliteStore::open(&typo, &settings()).await else {
            panic!("opened a file in a directory that does not exist");
        };
        assert!(matches!(err, OpenError::MissingDir { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "the directory {} does not exist",
                dir.path().join("no-such-dir").join("sub").display()
            )
        );
        assert!(!dir.path().join("no-such-dir").exists());
        // The file itself is created when its directory exists.
        let store = SqliteStore::open(&dir.path().join("new.db"), &settings())
            .await
            .unwrap();
        assert!(dir.path().join("new.db").is_file());
        store.close().await;
    }

    fn settings() -> SqliteSettings {
        SqliteSettings {
            busy_timeout: Duration::from_secs(2),
            ..SqliteSettings::default()
        }
    }

    async fn read_all(store: &SqliteStore, from: FeedCursor, page: usize) -> Vec<(i64, Event)> {
        let mut cursor = from;
        let mut all = Vec::new();
        loop {
            let batch = store.read_feed(cursor, page).await.expect("read_feed");
            assert!(!batch.pending);
            assert!(batch.events.len() <= page);
            let count = i64::try_from(batch.events.len()).unwrap();
            // Cursors advance by one per event: no gap, no repeat.
            assert_eq!(batch.cursor.minor, cursor.minor + count);
            all.extend((1..=count).map(|i| cursor.minor + i).zip(batch.events));
            cursor = batch.cursor;
            if !batch.more {
                return all;
            }
        }
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_fails_with_the_lock_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actionsd.db");
        let first = SqliteStore::open(&path, &settings()).await.unwrap();
        let Err(err) = SqliteStore::open(&path, &settings()).await else {
            panic!("a second open succeeded");
        };
        assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "another actionsd is using {}; SQLite allows one daemon per file — use Postgres to run several",
                path.display()
            )
        );
        first.close().await;
        // Closing releases the lock.
        let again = SqliteStore::open(&path, &settings()).await.unwrap();
        again.close().await;
    }

    #[tokio::test]
    async fn migrations_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let store = open(&dir).await;
            let applied: Vec<i64> = sqlx::query_scalar(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(store.pool())
            .await
            .unwrap();
            let embedded: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
            assert_eq!(applied, embedded);
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(store.pool())
                .await
                .unwrap();
            assert_eq!(journal, "wal");
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(store.pool())
                .await
                .unwrap();
            assert_eq!(synchronous, 2, "synchronous = FULL");
            let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(store.pool())
                .await
                .unwrap();
            assert_eq!(foreign_keys, 1);
            store.close().await;
        }
    }

    #[tokio::test]
    async fn commands_round_trip_and_the_feed_returns_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let start = store.feed_start().await.unwrap();
        assert_eq!(start, FeedCursor::default());

        // Enqueue: root, idempotent repeat, conflicting content, second root.
        assert_eq!(
            store
                .execute(Command::Enqueue(task("a0", None)))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .execute(Command::Enqueue(task("a0", None)))
                .await
                .unwrap(),
            0
        );
        let changed = EnqueueAction {
            spec: spec("a0", "s3://b/other"),
            ..task("a0", None)
        };
        let err = store.execute(Command::Enqueue(changed)).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
        let err = store
            .execute(Command::Enqueue(task("b0", None)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::AlreadyExists(m) if m.contains("'a0'")),
            "{err:?}"
        );

        // Children: missing parent, a task inheriting the run's queue, a
        // task with its own queue, a condition with a deadline, a grandchild.
        let err = store
            .execute(Command::Enqueue(task("c9", Some("nope"))))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ParentNotFound(_)), "{err:?}");
        assert_eq!(
            store
                .execute(Command::Enqueue(task("c1", Some("a0"))))
                .await
                .unwrap(),
            1
        );
        let own_queue = EnqueueAction {
            task_queue: Some("cpu".to_owned()),
            ..task("c2", Some("a0"))
        };
        assert_eq!(store.execute(Command::Enqueue(own_queue)).await.unwrap(), 1);
        assert_eq!(
            store
                .execute(Command::Enqueue(condition("k1", "a0")))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .execute(Command::Enqueue(task("g1", Some("c1"))))
                .await
                .unwrap(),
            1
        );
        let queues: Vec<(String, Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT name, queue, deadline FROM actions ORDER BY name")
                .fetch_all(store.pool())
                .await
                .unwrap();
        let now = now_micros();
        for (name, queue, deadline) in &queues {
            match name.as_str() {
                "a0" | "c1" | "g1" => assert_eq!(queue.as_deref(), Some("gpu"), "{name}"),
                "c2" => assert_eq!(queue.as_deref(), Some("cpu")),
                "k1" => {
                    assert_eq!(queue, &None);
                    let deadline = deadline.expect("a condition with a timeout has a deadline");
                    assert!(deadline > now + 50_000_000 && deadline <= now + 60_000_000);
                }
                other => panic!("unexpected action {other}"),
            }
        }

        // Update: forward, repeat, backwards, stale.
        assert_eq!(
            store
                .execute(update("c1", 1, Phase::Running))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .execute(update("c1", 1, Phase::Running))
                .await
                .unwrap(),
            0
        );
        let err = store
            .execute(update("c1", 1, Phase::Queued))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert_eq!(
            store
                .execute(update("c2", 1, Phase::Succeeded))
                .await
                .unwrap(),
            1
        );
        let err = store
            .execute(update("zz", 1, Phase::Running))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");

        // Signal: resolve, repeat, different value.
        assert_eq!(store.execute(signal("k1", "a0", b"yes")).await.unwrap(), 1);
        assert_eq!(store.execute(signal("k1", "a0", b"yes")).await.unwrap(), 0);
        let err = store.execute(signal("k1", "a0", b"no")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

        // Abort the root: a0, c1 and g1 are aborted; c2 and k1 are terminal.
        assert_eq!(store.execute(abort("a0")).await.unwrap(), 3);
        let err = store.execute(abort("a0")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let err = store
            .execute(Command::Enqueue(task("c3", Some("a0"))))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::ParentTerminal {
                    phase: Phase::Aborted,
                    ..
                }
            ),
            "{err:?}"
        );

        // The snapshot: the action, then its children by creation.
        let snapshot = store
            .watch_snapshot(&id("a0"), None, 100)
            .await
            .unwrap()
            .items;
        let names: Vec<&str> = snapshot.iter().map(|s| s.id.name.as_str()).collect();
        assert_eq!(names, ["a0", "c1", "c2", "k1"]);
        let phases: Vec<Phase> = snapshot.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Aborted,
                Phase::Aborted,
                Phase::Succeeded,
                Phase::Succeeded
            ]
        );
        assert_eq!(snapshot[0].error.as_deref(), Some(&b"aborted-error"[..]));
        assert_eq!(snapshot[3].value.as_deref(), Some(&b"yes"[..]));
        let err = store
            .watch_snapshot(&id("zz"), None, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");
        let (reason, by): (String, Vec<u8>) =
            sqlx::query_as("SELECT abort_reason, aborted_by FROM actions WHERE name = 'g1'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!((reason.as_str(), by.as_slice()), ("stop", &b"who"[..]));

        // The feed: 5 enqueues + 2 updates + 1 signal + 3 aborts, each once,
        // in commit order, read in pages smaller than the log.
        let events = read_all(&store, start, 4).await;
        let seen: Vec<(&str, i64, Phase)> = events
            .iter()
            .map(|(_, e)| (e.id.name.as_str(), e.version, e.phase))
            .collect();
        assert_eq!(
            &seen[..8],
            [
                ("a0", 1, Phase::Queued),
                ("c1", 1, Phase::Queued),
                ("c2", 1, Phase::Queued),
                ("k1", 1, Phase::Paused),
                ("g1", 1, Phase::Queued),
                ("c1", 2, Phase::Running),
                ("c2", 2, Phase::Succeeded),
                ("k1", 2, Phase::Succeeded),
            ]
        );
        let mut aborted: Vec<(&str, i64, Phase)> = seen[8..].to_vec();
        aborted.sort_unstable_by_key(|(name, version, _)| (*name, *version));
        assert_eq!(
            aborted,
            [
                ("a0", 2, Phase::Aborted),
                ("c1", 3, Phase::Aborted),
                ("g1", 2, Phase::Aborted),
            ]
        );
        assert!(events[8..]
            .iter()
            .all(|(_, e)| e.error.as_deref() == Some(&b"aborted-error"[..])));
        let seqs: Vec<i64> = events.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
        assert_eq!(store.feed_start().await.unwrap().minor, 11);
        let empty = store
            .read_feed(
                FeedCursor {
                    major: 0,
                    minor: 11,
                },
                10,
            )
            .await
            .unwrap();
        assert!(empty.events.is_empty() && !empty.more && !empty.pending);
        assert_eq!(empty.cursor.minor, 11);

        assert!(store.listen().await.unwrap().is_none());
        store.notify_peers().await.unwrap();
        store.ping().await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn concurrent_writers_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(open(&dir).await);
        store
            .execute(Command::Enqueue(task("a0", None)))
            .await
            .unwrap();
        let mut writers = tokio::task::JoinSet::new();
        for i in 0..16 {
            let store = store.clone();
            writers.spawn(async move {
                let name = format!("c{i}");
                store
                    .execute(Command::Enqueue(task(&name, Some("a0"))))
                    .await
                    .unwrap();
                store
                    .execute(update(&name, 1, Phase::Running))
                    .await
                    .unwrap()
            });
        }
        while let Some(result) = writers.join_next().await {
            assert_eq!(result.unwrap(), 1);
        }
        let events = read_all(&store, FeedCursor::default(), 7).await;
        assert_eq!(events.len(), 1 + 16 * 2);
        store.close().await;
    }

    #[tokio::test]
    async fn a_write_lock_held_past_the_busy_timeout_is_unavailable() {
        use sqlx::Connection;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actionsd.db");
        let store = SqliteStore::open(
            &path,
            &SqliteSettings {
                busy_timeout: Duration::from_millis(100),
                ..SqliteSettings::default()
            },
        )
        .await
        .unwrap();
        // A connection outside the store (what a second writer would be)
        // holds the write lock.
        let mut other =
            SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
                .await
                .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let err = store
            .execute(Command::Enqueue(task("a0", None)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m == "database busy; retry"),
            "{err:?}"
        );
        // Reads go on meanwhile (WAL), and writes once the lock is gone.
        store.ping().await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        assert_eq!(
            store
                .execute(Command::Enqueue(task("a0", None)))
                .await
                .unwrap(),
            1
        );
        other.close().await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn state_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store
            .execute(Command::Enqueue(task("a0", None)))
            .await
            .unwrap();
        store
            .execute(Command::Enqueue(task("c1", Some("a0"))))
            .await
            .unwrap();
        store
            .execute(update("c1", 2, Phase::Running))
            .await
            .unwrap();
        let before = store.watch_snapshot(&id("a0"), None, 100).await.unwrap();
        let cursor = store.feed_start().await.unwrap();
        store.close().await;
        drop(store);

        let store = open(&dir).await;
        assert_eq!(
            store.watch_snapshot(&id("a0"), None, 100).await.unwrap(),
            before
        );
        assert_eq!(store.feed_start().await.unwrap(), cursor);
        // Sequence numbers go on from where they were.
        store
            .execute(update("c1", 2, Phase::Succeeded))
            .await
            .unwrap();
        let batch = store.read_feed(cursor, 10).await.unwrap();
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.cursor.minor, cursor.minor + 1);
        assert_eq!(batch.events[0].attempt, 2);
        assert_eq!(
            store
                .execute(Command::Enqueue(task("a0", None)))
                .await
                .unwrap(),
            0
        );
        store.close().await;
    }

    fn in_run(action: EnqueueAction, run: &str) -> EnqueueAction {
        let run_id = RunId {
            name: run.to_owned(),
            ..run_id()
        };
        EnqueueAction {
            id: ActionId::new(run_id, action.id.name.clone()),
            run_output_base: format!("s3://b/{run}/"),
            ..action
        }
    }

    fn claim_request(executor: &str, capacity: u32) -> ClaimRequest {
        ClaimRequest {
            executor: executor.to_owned(),
            queue: "gpu".to_owned(),
            capacity,
            max_leases: 0,
            lease_ttl: Duration::from_secs(60),
        }
    }

    fn finish(
        name: &str,
        executor: &str,
        attempt: u32,
        phase: Phase,
        output_uri: Option<&str>,
    ) -> Command {
        Command::Finish(FinishAction {
            id: id(name),
            executor: executor.to_owned(),
            attempt,
            phase,
            output_uri: output_uri.map(str::to_owned),
            error: None,
            retry: false,
        })
    }

    fn reap_settings(max_system_retries: u32) -> ReapSettings {
        ReapSettings {
            max_system_retries,
            lease_error: Bytes::from_static(b"lease-error"),
            timeout_error: Bytes::from_static(b"timeout-error"),
        }
    }

    async fn enqueue_all(store: &SqliteStore, actions: Vec<EnqueueAction>) {
        for action in actions {
            assert_eq!(store.execute(Command::Enqueue(action)).await.unwrap(), 1);
        }
    }

    /// (phase, attempt, lease_holder, lease_deadline, end_time, version) of
    /// an action of run r1.
    async fn lease_row(
        store: &SqliteStore,
        name: &str,
    ) -> (i64, i64, Option<String>, Option<i64>, Option<i64>, i64) {
        sqlx::query_as(
            "SELECT phase, attempt, lease_holder, lease_deadline, end_time, version FROM actions \
             WHERE run_name = 'r1' AND name = ?1",
        )
        .bind(name)
        .fetch_one(store.pool())
        .await
        .unwrap()
    }

    /// Moves the live leases of r1's `name` into the past.
    async fn expire_lease(store: &SqliteStore, name: &str) {
        sqlx::query(
            "UPDATE actions SET lease_deadline = lease_deadline - 3600000000 \
             WHERE run_name = 'r1' AND name = ?1 AND lease_deadline IS NOT NULL",
        )
        .bind(name)
        .execute(store.pool())
        .await
        .unwrap();
    }

    fn names(leases: &[Lease]) -> Vec<(&str, &str)> {
        leases
            .iter()
            .map(|l| (l.id.run.name.as_str(), l.id.name.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn claim_is_oldest_first_within_capacity_and_run_limits() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // r1 may lease 2 actions at once; r2 is unlimited.
        let limited = EnqueueAction {
            run: Some(RunSettings {
                run_spec: Bytes::from_static(b"run-spec-1"),
                queue: Some("gpu".to_owned()),
                max_action_concurrency: 2,
            }),
            ..task("a0", None)
        };
        let other_queue = EnqueueAction {
            task_queue: Some("cpu".to_owned()),
            ..task("x1", Some("a0"))
        };
        enqueue_all(
            &store,
            vec![
                limited,
                task("c1", Some("a0")),
                task("c2", Some("a0")),
                task("c3", Some("a0")),
                other_queue,
                condition("k1", "a0"),
                in_run(task("b0", None), "r2"),
                in_run(task("d1", Some("b0")), "r2"),
            ],
        )
        .await;
        // Creation order, unlike name order: c3, a0, x1, c1, b0, c2, d1.
        for (name, created) in [
            ("c3", 10),
            ("a0", 20),
            ("x1", 25),
            ("c1", 30),
            ("b0", 40),
            ("c2", 50),
            ("d1", 60),
        ] {
            sqlx::query("UPDATE actions SET created_at = ?1 WHERE name = ?2")
                .bind(created)
                .bind(name)
                .execute(store.pool())
                .await
                .unwrap();
        }
        let cursor = store.feed_start().await.unwrap();

        // Capacity 3: c3 and a0 fill r1's limit, so c1 is skipped for b0.
        let before = now_micros();
        let leases = store.claim(&claim_request("e1", 3)).await.unwrap();
        assert_eq!(names(&leases), [("r1", "c3"), ("r1", "a0"), ("r2", "b0")]);
        let c3 = &leases[0];
        assert_eq!(c3.attempt, 1);
        assert_eq!(c3.output_uri, "s3://b/r1/c3/1");
        assert_eq!(c3.spec, spec("c3", "s3://b/in"));
        assert_eq!(c3.run_spec, Bytes::from_static(b"run-spec-1"));
        assert_eq!(leases[2].output_uri, "s3://b/r2/b0/1");
        assert!(leases[2].run_spec.is_empty());
        let deadline = c3.deadline.timestamp_micros();
        assert!(deadline >= before + 60_000_000 && deadline <= now_micros() + 60_000_000);
        let (phase, attempt, holder, stored_deadline, _, version) = lease_row(&store, "c3").await;
        assert_eq!(
            (phase, attempt, holder.as_deref(), stored_deadline, version),
            (3, 1, Some("e1"), Some(deadline), 2)
        );

        // One event per lease, naming the queue and the executor.
        let events = read_all(&store, cursor, 10).await;
        assert_eq!(events.len(), 3);
        for (_, event) in &events {
            assert_eq!(event.phase, Phase::Initializing);
            assert_eq!(event.version, 2);
            assert_eq!(event.queue.as_deref(), Some("gpu"));
            assert_eq!(event.lease_holder.as_deref(), Some("e1"));
        }

        // e1 is full; e2 gets what r1's limit leaves: d1 only.
        assert!(store
            .claim(&claim_request("e1", 3))
            .await
            .unwrap()
            .is_empty());
        let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
        assert_eq!(names(&leases), [("r2", "d1")]);
        // A claimed attempt is not claimed again.
        assert!(store
            .claim(&claim_request("e2", 10))
            .await
            .unwrap()
            .is_empty());

        // c3 ends: r1 has room for one more, the oldest (c1 before c2), and
        // e1 has room for one more too.
        assert_eq!(
            store
                .execute(finish("c3", "e1", 1, Phase::Succeeded, None))
                .await
                .unwrap(),
            1
        );
        let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
        assert_eq!(names(&leases), [("r1", "c1")]);
        assert!(store
            .claim(&claim_request("e1", 3))
            .await
            .unwrap()
            .is_empty());

        // The other queue is served separately; conditions never are.
        let cpu = ClaimRequest {
            queue: "cpu".to_owned(),
            ..claim_request("e3", 10)
        };
        let leases = store.claim(&cpu).await.unwrap();
        assert!(leases.is_empty(), "r1 is at its limit: {leases:?}");
        let queued: Vec<String> =
            sqlx::query_scalar("SELECT name FROM actions WHERE phase = 1 ORDER BY name")
                .fetch_all(store.pool())
                .await
                .unwrap();
        assert_eq!(queued, ["c2", "x1"]);
        store.close().await;
    }

    #[tokio::test]
    async fn claim_serves_other_queues_and_unlimited_runs_up_to_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut actions = vec![task("a0", None)];
        for i in 0..40 {
            actions.push(task(&format!("c{i:02}"), Some("a0")));
        }
        actions.push(EnqueueAction {
            task_queue: Some("cpu".to_owned()),
            ..task("x1", Some("a0"))
        });
        enqueue_all(&store, actions).await;
        let cpu = ClaimRequest {
            queue: "cpu".to_owned(),
            ..claim_request("e1", 10)
        };
        assert_eq!(names(&store.claim(&cpu).await.unwrap()), [("r1", "x1")]);
        // e1 holds one lease, so 39 more fit.
        let leases = store.claim(&claim_request("e1", 40)).await.unwrap();
        assert_eq!(leases.len(), 39);
        let leases = store.claim(&claim_request("e2", 100)).await.unwrap();
        assert_eq!(leases.len(), 2);
        store.close().await;
    }

    #[tokio::test]
    async fn claim_pages_past_runs_at_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // r1 (limit 1) has many old queued actions; r2's one is newer.
        let mut actions = vec![EnqueueAction {
            run: Some(RunSettings {
                run_spec: Bytes::new(),
                queue: Some("gpu".to_owned()),
                max_action_concurrency: 1,
            }),
            ..task("a0", None)
        }];
        for i in 0..40 {
            actions.push(task(&format!("c{i:02}"), Some("a0")));
        }
        actions.push(in_run(task("b0", None), "r2"));
        enqueue_all(&store, actions).await;
        let leases = store.claim(&claim_request("e1", 1)).await.unwrap();
        assert_eq!(names(&leases), [("r1", "a0")]);
        let leases = store.claim(&claim_request("e2", 1)).await.unwrap();
        assert_eq!(names(&leases), [("r2", "b0")]);
        store.close().await;
    }

    #[tokio::test]
    async fn heartbeat_extends_live_leases_and_reports_an_abort_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        enqueue_all(
            &store,
            vec![
                task("a0", None),
                task("c1", Some("a0")),
                task("c2", Some("a0")),
            ],
        )
        .await;
        let leases = store.claim(&claim_request("e1", 10)).await.unwrap();
        assert_eq!(leases.len(), 3);
        assert_eq!(store.execute(abort("c1")).await.unwrap(), 1);
        // c2 ends without a Finish: released, but not reported.
        assert_eq!(
            store
                .execute(update("c2", 1, Phase::Succeeded))
                .await
                .unwrap(),
            1
        );
        expire_lease(&store, "a0").await;
        let (_, _, _, _, _, version) = lease_row(&store, "a0").await;
        let cursor = store.feed_start().await.unwrap();

        let before = now_micros();
        let beat = store
            .heartbeat("e1", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            beat.cancelled,
            [Cancellation {
                id: id("c1"),
                attempt: 1,
                reason: "stop".to_owned(),
            }]
        );
        let deadline = beat.deadline.timestamp_micros();
        assert!(deadline >= before + 30_000_000 && deadline <= now_micros() + 30_000_000);
        // a0 is extended (even past its deadline, until a reaper took it);
        // the ended leases are released. No version change, no event.
        let a0 = lease_row(&store, "a0").await;
        assert_eq!((a0.3, a0.5), (Some(deadline), version));
        assert_eq!(lease_row(&store, "c1").await.3, None);
        assert_eq!(lease_row(&store, "c2").await.3, None);
        assert_eq!(store.feed_start().await.unwrap(), cursor);

        // Reported once.
        let beat = store
            .heartbeat("e1", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(beat.cancelled.is_empty());
        // Another executor's heartbeat touches nothing of e1's.
        let other = store
            .heartbeat("e2", Duration::from_secs(90))
            .await
            .unwrap();
        assert!(other.cancelled.is_empty());
        assert_eq!(
            lease_row(&store, "a0").await.3,
            Some(beat.deadline.timestamp_micros())
        );
        // The released leases no longer count against e1's capacity.
        enqueue_all(&store, vec![task("c3", Some("a0"))]).await;
        let leases = store.claim(&claim_request("e1", 2)).await.unwrap();
        assert_eq!(names(&leases), [("r1", "c3")]);
        store.close().await;
    }

    #[tokio::test]
    async fn finish_needs_the_holder_and_the_current_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        enqueue_all(
            &store,
            vec![
                task("a0", None),
                task("c1", Some("a0")),
                condition("k1", "a0"),
            ],
        )
        .await;
        assert_eq!(
            store.claim(&claim_request("e1", 10)).await.unwrap().len(),
            2
        );
        let cursor = store.feed_start().await.unwrap();

        for (command, what) in [
            (
                finish("a0", "e2", 1, Phase::Succeeded, None),
                "other executor",
            ),
            (
                finish("a0", "e1", 2, Phase::Succeeded, None),
                "stale attempt",
            ),
            (finish("k1", "e1", 1, Phase::Succeeded, None), "not a task"),
        ] {
            let err = store.execute(command).await.unwrap_err();
            assert!(
                matches!(err, Error::FailedPrecondition(_)),
                "{what}: {err:?}"
            );
        }
        let err = store
            .execute(finish("zz", "e1", 1, Phase::Succeeded, None))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");

        // The default output location; the lease ends, the holder stays.
        assert_eq!(
            store
                .execute(finish("a0", "e1", 1, Phase::Succeeded, None))
                .await
                .unwrap(),
            1
        );
        let (phase, attempt, holder, deadline, end_time, version) = lease_row(&store, "a0").await;
        assert_eq!(
            (phase, attempt, holder.as_deref(), deadline, version),
            (5, 1, Some("e1"), None, 3)
        );
        assert!(end_time.is_some());
        // A repeat changes nothing; a different end is refused.
        assert_eq!(
            store
                .execute(finish("a0", "e1", 1, Phase::Succeeded, None))
                .await
                .unwrap(),
            0
        );
        let err = store
            .execute(finish("a0", "e1", 1, Phase::Failed, None))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

        // A given output location and error are stored as given.
        let failed = Command::Finish(FinishAction {
            id: id("c1"),
            executor: "e1".to_owned(),
            attempt: 1,
            phase: Phase::Failed,
            output_uri: Some("s3://elsewhere/c1".to_owned()),
            error: Some(Bytes::from_static(b"user-error")),
            retry: false,
        });
        assert_eq!(store.execute(failed).await.unwrap(), 1);

        let events = read_all(&store, cursor, 10).await;
        let seen: Vec<_> = events
            .iter()
            .map(|(_, e)| {
                (
                    e.id.name.as_str(),
                    e.phase,
                    e.output_uri.as_str(),
                    e.error.as_deref(),
                    e.lease_holder.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a0", Phase::Succeeded, "s3://b/r1/a0/1", None, Some("e1")),
                (
                    "c1",
                    Phase::Failed,
                    "s3://elsewhere/c1",
                    Some(&b"user-error"[..]),
                    Some("e1")
                ),
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn reap_requeues_expired_leases_then_fails_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        enqueue_all(&store, vec![task("a0", None), task("c1", Some("a0"))]).await;
        assert_eq!(
            store.claim(&claim_request("e1", 10)).await.unwrap().len(),
            2
        );
        // c1 ends without a Finish, so its lease stays until it expires.
        assert_eq!(
            store
                .execute(update("c1", 1, Phase::Succeeded))
                .await
                .unwrap(),
            1
        );
        // Nothing expired yet.
        assert_eq!(
            store.reap(&reap_settings(1)).await.unwrap(),
            ReapOutcome::default()
        );
        expire_lease(&store, "a0").await;
        expire_lease(&store, "c1").await;
        let cursor = store.feed_start().await.unwrap();

        let outcome = store.reap(&reap_settings(1)).await.unwrap();
        assert_eq!(
            outcome,
            ReapOutcome {
                requeued: 1,
                failed: 0,
                timed_out: 0
            }
        );
        assert_eq!(lease_row(&store, "a0").await, (1, 2, None, None, None, 3));
        // The terminal action's lease is cleared without a change.
        let c1 = lease_row(&store, "c1").await;
        assert_eq!((c1.0, c1.3, c1.5), (5, None, 3));

        // The next attempt is leased as any queued action.
        let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
        assert_eq!(names(&leases), [("r1", "a0")]);
        assert_eq!(
            (leases[0].attempt, leases[0].output_uri.as_str()),
            (2, "s3://b/r1/a0/2")
        );
        expire_lease(&store, "a0").await;
        let outcome = store.reap(&reap_settings(1)).await.unwrap();
        assert_eq!(
            outcome,
            ReapOutcome {
                requeued: 0,
                failed: 1,
                timed_out: 0
            }
        );
        let (phase, attempt, holder, deadline, end_time, version) = lease_row(&store, "a0").await;
        assert_eq!(
            (phase, attempt, holder, deadline, version),
            (6, 2, None, None, 5)
        );
        assert!(end_time.is_some());
        let error: Vec<u8> = sqlx::query_scalar("SELECT error FROM actions WHERE name = 'a0'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(error, b"lease-error");
        assert_eq!(
            store.reap(&reap_settings(1)).await.unwrap(),
            ReapOutcome::default()
        );

        let events = read_all(&store, cursor, 10).await;
        let seen: Vec<(&str, i64, Phase, u32, Option<&str>)> = events
            .iter()
            .map(|(_, e)| {
                (
                    e.id.name.as_str(),
                    e.version,
                    e.phase,
                    e.attempt,
                    e.lease_holder.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a0", 3, Phase::Queued, 2, None),
                ("a0", 4, Phase::Initializing, 2, Some("e2")),
                ("a0", 5, Phase::Failed, 2, None),
            ]
        );
        assert_eq!(events[2].1.error.as_deref(), Some(&b"lease-error"[..]));
        store.close().await;
    }

    #[tokio::test]
    async fn reap_times_out_conditions_past_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        enqueue_all(
            &store,
            vec![
                task("a0", None),
                condition("k1", "a0"),
                condition("k2", "a0"),
            ],
        )
        .await;
        assert_eq!(
            store.reap(&reap_settings(1)).await.unwrap(),
            ReapOutcome::default()
        );
        sqlx::query("UPDATE actions SET deadline = ?1 WHERE name = 'k1'")
            .bind(now_micros() - 1_000_000)
            .execute(store.pool())
            .await
            .unwrap();
        let cursor = store.feed_start().await.unwrap();
        let outcome = store.reap(&reap_settings(1)).await.unwrap();
        assert_eq!(
            outcome,
            ReapOutcome {
                requeued: 0,
                failed: 0,
                timed_out: 1
            }
        );
        let (phase, _, _, _, end_time, version) = lease_row(&store, "k1").await;
        assert_eq!((phase, version), (8, 2));
        assert!(end_time.is_some());
        assert_eq!(lease_row(&store, "k2").await.0, 9);
        let events = read_all(&store, cursor, 10).await;
        assert_eq!(events.len(), 1);
        let event = &events[0].1;
        assert_eq!(
            (event.id.name.as_str(), event.phase, event.error.as_deref()),
            ("k1", Phase::TimedOut, Some(&b"timeout-error"[..]))
        );
        // Once.
        assert_eq!(
            store.reap(&reap_settings(1)).await.unwrap(),
            ReapOutcome::default()
        );
        store.close().await;
    }

    #[test]
    fn the_default_path_is_in_the_user_data_directory() {
        if let Some(path) = SqliteStore::default_path() {
            assert!(path.ends_with("actionsd/actionsd.db"), "{}", path.display());
        }
    }
}
