//! Statements both backends run as they are: SQLite reads `$N` parameters
//! as Postgres does, and both have row values and RETURNING. What differs
//! (row locks, time arithmetic, feed columns) stays in each backend.

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use crate::domain::Error;
use crate::domain::{ActionId, RunId, RunSettings};
use crate::store::apply::{FoundParent, RunRoot, Stored};
use crate::store::lease::Candidate;
use crate::store::rows::{
    queued_task, terminal_phases, BindId, CurrentRow, IdRow, LeaseRow, ParentRow, ReleasedRow,
    StoredRow, StoredTime,
};

/// An existing action's stored content, for a repeated Enqueue (the key
/// as `$1..$5`).
pub(crate) const STORED: &str = "SELECT a.spec, r.run_spec, r.root_name = a.name AS is_root \
     FROM actions a JOIN runs r \
       ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
     WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4 AND a.name = $5";

/// The name of a run's root action (the run's key as `$1..$4`).
pub(crate) const RUN_ROOT: &str =
    "SELECT root_name FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4";

/// A parent's phase and its run's queue (the run as `$1..$4`, the parent's
/// name as `$5`); Postgres appends its row lock.
pub(crate) const PARENT: &str = "SELECT a.phase, r.queue FROM actions a JOIN runs r \
       ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
     WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4 AND a.name = $5";

/// What the rules read of an action's row (the key as `$1..$5`);
/// Postgres appends its row lock.
pub(crate) const CURRENT: &str =
    "SELECT kind, phase, attempt, parent_name, condition_type, value, lease_holder, \
       run_output_base, address FROM actions \
     WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5";

/// An executor's unfinished leases (`$1`), and how many of them wait on
/// unfinished children (counted when `$2`).
pub(crate) fn held() -> String {
    format!(
        "SELECT count(*), coalesce(sum(CASE WHEN $2 AND EXISTS ( \
           SELECT 1 FROM actions c \
           WHERE (c.org, c.project, c.domain, c.run_name, c.parent_name) \
               = (a.org, a.project, a.domain, a.run_name, a.name) \
             AND c.phase NOT IN {terminal}) THEN 1 ELSE 0 END), 0) \
         FROM actions a WHERE a.lease_holder = $1 AND a.lease_deadline IS NOT NULL \
         AND a.phase NOT IN {terminal}",
        terminal = terminal_phases()
    )
}

/// A run's live leases (the run as `$1..$4`).
pub(crate) fn run_leases() -> String {
    format!(
        "SELECT count(*) FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 \
           AND lease_deadline IS NOT NULL AND phase NOT IN {}",
        terminal_phases()
    )
}

/// Releases the leases of executor `$1` whose action ended, returning
/// them.
pub(crate) fn release_ended() -> String {
    format!(
        "UPDATE actions SET lease_deadline = NULL \
         WHERE lease_holder = $1 AND lease_deadline IS NOT NULL AND phase IN {} \
         RETURNING org, project, domain, run_name, name, attempt, phase, abort_reason",
        terminal_phases()
    )
}

/// Live leases of every executor.
pub(crate) fn leases_held() -> String {
    format!(
        "SELECT count(*) FROM actions \
         WHERE lease_deadline IS NOT NULL AND phase NOT IN {}",
        terminal_phases()
    )
}

/// Binds a run's key columns (org, project, domain, name) to `$1..$4`.
macro_rules! bind_run {
    ($query:expr, $run:expr) => {
        $query
            .bind(&$run.org)
            .bind(&$run.project)
            .bind(&$run.domain)
            .bind(&$run.name)
    };
}

/// Runs [`RUN_ROOT`].
pub(crate) async fn run_root<'c, DB, E>(conn: E, run: &RunId) -> Result<String, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    (String,): for<'r> FromRow<'r, DB::Row>,
{
    bind_run!(sqlx::query_scalar(RUN_ROOT), run)
        .fetch_one(conn)
        .await
}

/// Runs [`run_leases`]. With a row lock (`lock`, may be empty), the run
/// is locked first, by a statement of its own: the count must see the
/// leases of a claimer that held the lock and committed meanwhile. `trip`
/// counts each statement.
pub(crate) async fn count_run_leases<DB>(
    conn: &mut DB::Connection,
    run: &RunId,
    lock: &str,
    trip: fn(),
) -> Result<i64, sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
{
    if !lock.is_empty() {
        let sql = format!(
            "SELECT 1 FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4{lock}"
        );
        trip();
        bind_run!(sqlx::query(&sql), run)
            .execute(&mut *conn)
            .await?;
    }
    let sql = run_leases();
    trip();
    bind_run!(sqlx::query_scalar(&sql), run)
        .fetch_one(&mut *conn)
        .await
}

/// Runs [`PARENT`] with the backend's row lock (`lock`, may be empty);
/// `trip` counts the statement.
pub(crate) async fn parent<'c, DB, E>(
    conn: E,
    id: &ActionId,
    parent: &str,
    lock: &str,
    trip: fn(),
) -> Result<FoundParent, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    ParentRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!("{PARENT}{lock}");
    trip();
    let row: Option<ParentRow> = bind_run!(sqlx::query_as(&sql), id.run)
        .bind(parent)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|row| (row.phase, row.queue)))
}

/// Runs [`held`].
pub(crate) async fn count_held<'c, DB, E>(
    conn: E,
    executor: &str,
    count_waiting: bool,
) -> Result<(i64, i64), sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    bool: for<'q> Encode<'q, DB> + Type<DB>,
    (i64, i64): for<'r> FromRow<'r, DB::Row>,
{
    let sql = held();
    sqlx::query_as(&sql)
        .bind(executor)
        .bind(count_waiting)
        .fetch_one(conn)
        .await
}

/// Runs [`release_ended`].
pub(crate) async fn release<'c, DB, E>(
    conn: E,
    executor: &str,
) -> Result<Vec<ReleasedRow>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    ReleasedRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = release_ended();
    sqlx::query_as(&sql).bind(executor).fetch_all(conn).await
}

/// Up to `limit` queued task actions of `queue` after `after`, in the
/// claim order, each with its run's `max_action_concurrency`; `lock` is
/// the backend's row lock (may be empty). `T` is `created_at` as the
/// backend binds and decodes it.
pub(crate) async fn candidates<'c, DB, E, T>(
    conn: E,
    queue: &str,
    after: Option<&(T, ActionId)>,
    limit: usize,
    lock: &str,
    db_error: fn(sqlx::Error) -> Error,
) -> Result<Vec<Candidate<(T, ActionId)>>, Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    T: Clone + Send + Sync + Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    Option<T>: for<'q> Encode<'q, DB> + Type<DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    bool: for<'q> Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    i32: for<'r> sqlx::Decode<'r, DB> + Type<DB>,
    IdRow: for<'r> FromRow<'r, DB::Row>,
    for<'r> &'r str: sqlx::ColumnIndex<DB::Row>,
{
    use sqlx::Row;
    let sql = format!(
        "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.created_at, \
                r.max_action_concurrency \
         FROM actions a JOIN runs r \
           ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
         WHERE a.queue = $1 AND {queued} \
           AND ($9 OR (a.created_at, a.org, a.project, a.domain, a.run_name, a.name) \
                      > ($3, $4, $5, $6, $7, $8)) \
         ORDER BY a.created_at, a.org, a.project, a.domain, a.run_name, a.name \
         LIMIT $2{lock}",
        queued = queued_task("a.")
    );
    let after_id = after.map(|(_, id)| id);
    let rows = sqlx::query(&sql)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(after.map(|(time, _)| time.clone()))
        .bind(after_id.map(|id| id.run.org.as_str()))
        .bind(after_id.map(|id| id.run.project.as_str()))
        .bind(after_id.map(|id| id.run.domain.as_str()))
        .bind(after_id.map(|id| id.run.name.as_str()))
        .bind(after_id.map(|id| id.name.as_str()))
        .bind(after.is_none())
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| {
            let id = IdRow::from_row(row).map_err(db_error)?.into_id();
            Ok(Candidate {
                position: (row.try_get("created_at").map_err(db_error)?, id.clone()),
                id,
                limit: row.try_get("max_action_concurrency").map_err(db_error)?,
            })
        })
        .collect()
}

/// Runs [`STORED`].
pub(crate) async fn stored<'c, DB, E>(conn: E, id: &ActionId) -> Result<Option<Stored>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    StoredRow: for<'r> FromRow<'r, DB::Row>,
{
    let row: Option<StoredRow> = sqlx::query_as(STORED)
        .bind_id(id)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(Stored::from))
}

/// Runs [`CURRENT`] with the backend's row lock (`lock`, may be empty).
pub(crate) async fn current<'c, DB, E>(
    conn: E,
    id: &ActionId,
    lock: &str,
) -> Result<Option<CurrentRow>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    CurrentRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!("{CURRENT}{lock}");
    sqlx::query_as(&sql).bind_id(id).fetch_optional(conn).await
}

/// Inserts the run of root action `id`, created at `created_at` (the
/// backend's transaction time) or, when `None`, at the column's default.
/// When the run exists nothing is written, and the name of its root is
/// returned (a second statement). `trip` counts each statement.
pub(crate) async fn insert_run<DB, T>(
    conn: &mut DB::Connection,
    id: &ActionId,
    run: &RunSettings,
    created_at: Option<T>,
    trip: fn(),
) -> Result<RunRoot, sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    T: for<'q> Encode<'q, DB> + Type<DB> + Send + 'static,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> &'q Option<String>: Encode<'q, DB> + Type<DB>,
    i32: for<'q> Encode<'q, DB> + Type<DB>,
    (String,): for<'r> FromRow<'r, DB::Row>,
{
    let (column, value) = if created_at.is_some() {
        (", created_at", ", $9")
    } else {
        ("", "")
    };
    let sql = format!(
        "INSERT INTO runs (org, project, domain, name, root_name, run_spec, queue, \
           max_action_concurrency{column}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8{value}) \
         ON CONFLICT (org, project, domain, name) DO NOTHING RETURNING 1"
    );
    let mut query = sqlx::query(&sql)
        .bind_id(id)
        .bind(run.run_spec.as_ref())
        .bind(&run.queue)
        .bind(i32::try_from(run.max_action_concurrency).unwrap_or(i32::MAX));
    if let Some(created_at) = created_at {
        query = query.bind(created_at);
    }
    trip();
    if query.fetch_optional(&mut *conn).await?.is_some() {
        return Ok(None);
    }
    trip();
    run_root(&mut *conn, &id.run).await.map(Some)
}

/// Executor `$1`'s unfinished leases, oldest first.
pub(crate) fn leases_of() -> String {
    format!(
        "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.spec, a.attempt, \
                a.lease_deadline, a.run_output_base, r.run_spec \
         FROM actions a JOIN runs r \
           ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
         WHERE a.lease_holder = $1 AND a.lease_deadline IS NOT NULL \
           AND a.phase NOT IN {} \
         ORDER BY a.created_at, a.name",
        terminal_phases()
    )
}

/// Runs [`leases_of`].
pub(crate) async fn held_leases<'c, DB, E>(
    conn: E,
    executor: &str,
) -> Result<Vec<LeaseRow>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    LeaseRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = leases_of();
    sqlx::query_as(&sql).bind(executor).fetch_all(conn).await
}

/// Whether run `run` may be deleted: it exists (else `RunNotFound`) and
/// every action of it has finished (else `FailedPrecondition`). `lock` is
/// the backend's row lock on the run (may be empty).
pub(crate) async fn check_deletable<DB>(
    conn: &mut DB::Connection,
    run: &RunId,
    lock: &str,
    db_error: fn(sqlx::Error) -> Error,
) -> Result<(), Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT 1 FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4{lock}"
    );
    let found = bind_run!(sqlx::query(&sql), run)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
    if found.is_none() {
        return Err(Error::RunNotFound(run.clone()));
    }
    let sql = format!(
        "SELECT count(*) FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 \
           AND phase NOT IN {}",
        terminal_phases()
    );
    let (going,): (i64,) = bind_run!(sqlx::query_as(&sql), run)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    if going > 0 {
        return Err(Error::FailedPrecondition(format!(
            "run {run} is still going: {going} of its actions have not finished; abort it first"
        )));
    }
    Ok(())
}

/// Up to `limit` deleted runs whose blobs and logs are still to purge,
/// oldest first.
pub(crate) async fn pending_purges<'c, DB, E>(
    conn: E,
    limit: usize,
) -> Result<Vec<RunId>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    (String, String, String, String): for<'r> FromRow<'r, DB::Row>,
{
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT org, project, domain, name FROM run_purges ORDER BY deleted_at LIMIT $1",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(org, project, domain, name)| RunId {
            org,
            project,
            domain,
            name,
        })
        .collect())
}

/// Forgets a run whose blobs and logs are purged.
pub(crate) async fn purged<'c, DB, E>(conn: E, run: &RunId) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
{
    bind_run!(
        sqlx::query(
            "DELETE FROM run_purges WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4",
        ),
        run
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The runs retention may take: the oldest whose root ended before `$1`
/// and none of whose actions is still going, `$2` at the most, with the
/// backend's row lock (`lock`, may be empty). Columns: the run's key.
pub(crate) fn finished_runs(lock: &str) -> String {
    format!(
        "SELECT r.org, r.project, r.domain, r.name FROM actions a \
         JOIN runs r ON r.org = a.org AND r.project = a.project AND r.domain = a.domain \
             AND r.name = a.run_name AND r.root_name = a.name \
         WHERE a.parent_name IS NULL AND a.end_time < $1 AND a.phase IN {terminal} \
           AND NOT EXISTS (SELECT 1 FROM actions c \
               WHERE c.org = a.org AND c.project = a.project AND c.domain = a.domain \
                 AND c.run_name = a.run_name AND c.phase NOT IN {terminal}) \
         ORDER BY a.end_time \
         LIMIT $2{lock}",
        terminal = terminal_phases()
    )
}

/// The depth of the `limit` deepest queues, and the live leases of every
/// executor.
pub(crate) async fn queue_stats<DB>(
    pool: &sqlx::Pool<DB>,
    limit: usize,
) -> Result<crate::store::QueueStats, sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    (String, i64, StoredTime): for<'r> FromRow<'r, DB::Row>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT COALESCE(queue, ''), count(*), min(created_at) FROM actions \
         WHERE {} GROUP BY queue ORDER BY count(*) DESC LIMIT $1",
        queued_task("")
    );
    let rows: Vec<(String, i64, StoredTime)> = sqlx::query_as(&sql)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    let (leases_held,) = sqlx::query_as(&leases_held()).fetch_one(pool).await?;
    Ok(crate::store::QueueStats {
        queues: rows
            .into_iter()
            .map(|(queue, queued, oldest)| crate::store::QueueDepth {
                queue,
                queued,
                oldest: oldest.0,
            })
            .collect(),
        leases_held,
    })
}
