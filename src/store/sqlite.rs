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

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, Row};
use tracing::{instrument, warn};

use self::tx::SqliteTx;
use super::apply;
use super::commit::{Committers, GroupCommit};
use super::rows::{terminal_phases, waiting_condition, FeedRow, IdRow, StoredTime};
use super::{FeedBatch, FeedCursor, PeerListener, Store};
use crate::domain::{
    ClaimRequest, Command, Error, HeartbeatOutcome, Lease, LeaseExpiry, Phase, ReapOutcome,
    ReapSettings, CONDITION_TIMEOUT_PHASE,
};

/// The embedded migrations of the SQLite schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

mod lease;
mod read;
mod retention;
mod tx;

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
    /// Runs one call of the store. Its bound is SQLite's busy timeout
    /// (a connection waits at most that long for the file's lock) and the
    /// pool's acquire timeout; a statement on a local file needs no other.
    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        call.await
    }

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
impl SqliteStore {
    /// Takes this daemon's writer lock, then the database's write lock
    /// (`BEGIN IMMEDIATE`).
    async fn begin_write(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            sqlx::Transaction<'static, sqlx::Sqlite>,
        ),
        Error,
    > {
        let writer = self.writer.lock().await;
        trip();
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        Ok((writer, tx))
    }
}

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
        // Events are read in commit order (`seq`): the write lock lets
        // one transaction commit at a time, so nothing is ever pending.
        let rows: Vec<FeedRow> = sqlx::query_as(concat!(
            "SELECT 0 AS major, seq AS minor, created_at AS written_micros, ",
            state_columns!(),
            " FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(cursor.minor)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        super::read::feed_batch(cursor, rows, limit, false)
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
        // The write lock serialises claimers (here and in any other
        // connection): an attempt is leased once and every count stays true
        // until the commit, without row locks.
        let (_writer, mut conn) = self.begin_write().await?;
        let mut tx = SqliteTx {
            conn: &mut conn,
            now: now_micros(),
        };
        let leases = super::lease::claim(&mut tx, request).await?;
        trip();
        conn.commit().await.map_err(db_error)?;
        Ok(leases)
    }

    async fn heartbeat(&self, executor: &str, ttl: Duration) -> Result<HeartbeatOutcome, Error> {
        let (_writer, mut conn) = self.begin_write().await?;
        let mut tx = SqliteTx {
            conn: &mut conn,
            now: now_micros(),
        };
        let outcome = super::lease::heartbeat(&mut tx, executor, ttl).await?;
        trip();
        conn.commit().await.map_err(db_error)?;
        Ok(outcome)
    }

    async fn reap(&self, settings: &ReapSettings) -> Result<ReapOutcome, Error> {
        let (_writer, mut conn) = self.begin_write().await?;
        let mut tx = SqliteTx {
            conn: &mut conn,
            now: now_micros(),
        };
        let now = tx.now;
        // Expired leases: requeue with the next attempt while retries are
        // left, else fail with a SYSTEM error. The CASEs are
        // `LeaseExpiry::decide`, reading the row as it was before this
        // UPDATE.
        trip();
        let expired = sqlx::query(&format!(
            "UPDATE actions SET \
               phase = CASE WHEN attempt <= ?1 THEN ?4 ELSE ?5 END, \
               attempt = CASE WHEN attempt <= ?1 THEN attempt + 1 ELSE attempt END, \
               error = CASE WHEN attempt <= ?1 THEN error ELSE ?2 END, \
               end_time = CASE WHEN attempt <= ?1 THEN end_time ELSE ?3 END, \
               lease_holder = NULL, lease_deadline = NULL, \
               version = version + 1, updated_at = ?3 \
             WHERE lease_deadline < ?3 AND phase NOT IN {} \
             RETURNING org, project, domain, run_name, name, phase",
            terminal_phases()
        ))
        .bind(i64::from(settings.max_system_retries))
        .bind(settings.lease_error.as_ref())
        .bind(now)
        .bind(LeaseExpiry::Requeue.phase())
        .bind(LeaseExpiry::Fail.phase())
        .fetch_all(&mut *tx.conn)
        .await
        .map_err(db_error)?;
        let mut outcome = ReapOutcome::default();
        for row in &expired {
            let phase: Phase = row.try_get("phase").map_err(db_error)?;
            if phase == LeaseExpiry::Requeue.phase() {
                outcome.requeued += 1;
            } else {
                outcome.failed += 1;
            }
            tx.append_event(&IdRow::from_row(row).map_err(db_error)?.into_id(), None)
                .await?;
        }
        // Terminal actions whose lease was never released (their executor
        // vanished before a heartbeat reported the end).
        trip();
        sqlx::query(&format!(
            "UPDATE actions SET lease_deadline = NULL \
             WHERE lease_deadline < ?1 AND phase IN {}",
            terminal_phases()
        ))
        .bind(now)
        .execute(&mut *tx.conn)
        .await
        .map_err(db_error)?;
        // Conditions nobody signalled in time.
        trip();
        let due: Vec<IdRow> = sqlx::query_as(&format!(
            "UPDATE actions SET phase = ?3, error = ?1, end_time = ?2, \
               version = version + 1, updated_at = ?2 \
             WHERE {} AND deadline < ?2 \
             RETURNING org, project, domain, run_name, name",
            waiting_condition()
        ))
        .bind(settings.timeout_error.as_ref())
        .bind(now)
        .bind(CONDITION_TIMEOUT_PHASE)
        .fetch_all(&mut *tx.conn)
        .await
        .map_err(db_error)?;
        outcome.timed_out = due.len();
        for id in due {
            tx.append_event(&id.into_id(), None).await?;
        }
        trip();
        conn.commit().await.map_err(db_error)?;
        Ok(outcome)
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

housekeeping_of_every_backend!(SqliteStore);

/// Applies `commands` in one transaction (see [`apply::apply_batch`]). A
/// failed commit (or a failure that ends the transaction, such as a full
/// disk) fails every command.
async fn commit_batch(
    pool: SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
    commands: Vec<Command>,
) -> Vec<Result<usize, Error>> {
    let _writer = writer.lock().await;
    match transaction(&pool, &commands).await {
        Ok(results) => results,
        Err(err) => commands.iter().map(|_| Err(err.clone())).collect(),
    }
}

#[instrument(skip_all, fields(commands = commands.len()))]
async fn transaction(
    pool: &SqlitePool,
    commands: &[Command],
) -> Result<Vec<Result<usize, Error>>, Error> {
    // IMMEDIATE takes the write lock now, not at the first write: a
    // transaction that read first and then tried to write would fail
    // (SQLITE_BUSY) instead of waiting if another writer got in between.
    trip();
    let mut conn = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let mut tx = SqliteTx {
        conn: &mut conn,
        now: now_micros(),
    };
    let applied = apply::apply_batch(&mut tx, commands).await?;
    trip();
    apply::end_batch(conn, commands, applied, db_error).await
}

/// Counts one statement sent to SQLite (`actionsd_store_round_trips_total`).
fn trip() {
    metrics::counter!(crate::metrics::names::STORE_ROUND_TRIPS, "store" => "sqlite").increment(1);
}

/// Now, as stored: microseconds since the Unix epoch, UTC.
fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// A duration in stored units (microseconds), saturating.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A stored time: microseconds since the Unix epoch.
impl sqlx::Type<sqlx::Sqlite> for StoredTime {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <i64 as sqlx::Type<sqlx::Sqlite>>::type_info()
    }

    fn compatible(ty: &sqlx::sqlite::SqliteTypeInfo) -> bool {
        <i64 as sqlx::Type<sqlx::Sqlite>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Sqlite> for StoredTime {
    fn decode(value: sqlx::sqlite::SqliteValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let micros = <i64 as sqlx::Decode<sqlx::Sqlite>>::decode(value)?;
        Ok(StoredTime(time_from_micros(micros)?))
    }
}

/// A stored time (microseconds since the Unix epoch) as a UTC time.
fn time_from_micros(micros: i64) -> Result<DateTime<Utc>, Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| Error::Internal(format!("time {micros} out of range")))
}

/// The primary result code of a SQLite error (sqlx reports the extended
/// code, whose low byte is the primary one).
fn primary_code(db: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    db.code()?.parse::<i32>().ok().map(|code| code & 0xff)
}

/// Turns a database failure into a domain error, by error class and SQLite
/// result code only.
fn db_error(err: sqlx::Error) -> Error {
    super::map_db_error(err, |err, db| match primary_code(db) {
        // Another connection holds a lock past the busy timeout.
        Some(code::BUSY | code::LOCKED) => {
            warn!(error = %err, "database busy");
            Some(Error::Unavailable("database busy; retry".to_owned()))
        }
        // The file cannot be read, written or synced (disk full, I/O
        // error, file gone, lock protocol race): the change was rolled
        // back and may succeed later.
        Some(code::IOERR | code::FULL | code::CANTOPEN | code::PROTOCOL) => {
            Some(super::unavailable(err))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{id, task, update};
    use crate::store::{Housekeeping, ReadStore};

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
    async fn a_batch_sees_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.pool().clone();
        let writer = store.writer.clone();
        crate::store::conformance::a_batch_sees_its_own_writes(&store, |commands| {
            commit_batch(pool.clone(), writer.clone(), commands)
        })
        .await;
    }

    #[tokio::test]
    async fn a_batch_of_refusals_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.pool().clone();
        let writer = store.writer.clone();
        crate::store::conformance::a_batch_of_refusals_writes_nothing(&store, |commands| {
            commit_batch(pool.clone(), writer.clone(), commands)
        })
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
            sqlx::SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
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

    #[test]
    fn the_default_path_is_in_the_user_data_directory() {
        if let Some(path) = SqliteStore::default_path() {
            assert!(path.ends_with("actionsd/actionsd.db"), "{}", path.display());
        }
    }
}
