//! The read API's statements, run as they are by both stores: the SQL is
//! the same in both dialects, rows are decoded by `FromRow` (times through
//! [`StoredTime`](crate::store::rows::StoredTime)), and how a database
//! error maps to the API's is passed in (`db_error`). Each store wraps
//! these in its own bounds (Postgres its statement timeout).
//!
//! A listing's statement is built by `store::listing` with sqlx's
//! `QueryBuilder`, and executed by the store: a builder's arguments must
//! live as long as the borrow that executes it, which code generic over
//! the database cannot show (each backend's arguments type can), so only
//! the folding of the rows is here.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use crate::domain::{
    ActionId, ActionPosition, ActionRecord, ActionState, Error, HistoryEntry, Page, PageRequest,
    RunId, RunPosition, RunRecord, SnapshotPosition, PAGE_BUDGET,
};
use crate::store::listing::group_runs;
use crate::store::rows::{BindId, FeedRow, HistoryRow, RecordRow, RunPhaseRow, SnapshotRow};
use crate::store::{read_bounded, snapshot_page, FeedBatch, FeedCursor};

/// What an [`ActionRecord`] is read from after `state_columns!` and the
/// spec (or its stand-in).
const RECORD_TAIL: &str = "lease_deadline, abort_reason, aborted_by, signalled_by, \
     created_at, updated_at, start_time, end_time, deadline";

/// `sqlx::Error` to the API's error, as the backend maps it.
pub(crate) type DbError = fn(sqlx::Error) -> Error;

/// The RunSpec a run's root was enqueued with, or `RunNotFound`.
pub(crate) async fn run_spec<DB>(
    pool: &Pool<DB>,
    run: &RunId,
    db_error: DbError,
) -> Result<Bytes, Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    (Vec<u8>,): for<'r> FromRow<'r, DB::Row>,
{
    let spec: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT run_spec FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4",
    )
    .bind(&run.org)
    .bind(&run.project)
    .bind(&run.domain)
    .bind(&run.name)
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    spec.map(Bytes::from)
        .ok_or_else(|| Error::RunNotFound(run.clone()))
}

/// One action, or `ActionNotFound`.
pub(crate) async fn action<DB>(
    pool: &Pool<DB>,
    id: &ActionId,
    db_error: DbError,
) -> Result<ActionRecord, Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    RecordRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT {}, spec, {RECORD_TAIL} FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
        state_columns!()
    );
    sqlx::query_as::<_, RecordRow>(&sql)
        .bind_id(id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::ActionNotFound(id.clone()))?
        .into_record()
}

/// The columns a listing of actions reads: a record without its spec
/// (a spec may be megabytes), in whose place stands `empty_blob`.
pub(crate) fn listing_columns(empty_blob: &str) -> String {
    format!("{}, {empty_blob} AS spec, {RECORD_TAIL}", state_columns!())
}

/// The page of actions read from the rows of `listing::actions_page`
/// over [`listing_columns`], within the page's byte budget.
pub(crate) async fn actions_page<R, S>(
    rows: S,
    page: &PageRequest<ActionPosition>,
    db_error: DbError,
) -> Result<Page<ActionRecord, ActionPosition>, Error>
where
    S: futures_util::Stream<Item = Result<R, sqlx::Error>> + Unpin,
    R: sqlx::Row,
    RecordRow: for<'r> FromRow<'r, R>,
{
    let records = read_bounded(
        rows,
        |row| RecordRow::from_row(row).map_err(db_error)?.into_record(),
        ActionRecord::approximate_size,
        page.limit,
        db_error,
    )
    .await?;
    Ok(Page::from_overfetch_within(
        records,
        page.limit,
        ActionRecord::position,
        ActionRecord::approximate_size,
        PAGE_BUDGET,
    ))
}

/// The page of runs folded from the rows of `listing::runs_page`.
pub(crate) fn runs_page(
    rows: Vec<RunPhaseRow>,
    page: &PageRequest<RunPosition>,
) -> Page<RunRecord, RunPosition> {
    Page::from_overfetch(group_runs(rows), page.limit, RunRecord::position)
}

/// Every event of one action, oldest first, or `ActionNotFound`.
pub(crate) async fn history<DB>(
    pool: &Pool<DB>,
    id: &ActionId,
    db_error: DbError,
) -> Result<Vec<HistoryEntry>, Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    HistoryRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT {}, created_at, changed_by FROM events \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5 \
         ORDER BY version",
        state_columns!()
    );
    let rows: Vec<HistoryRow> = sqlx::query_as(&sql)
        .bind_id(id)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
    // Every action has at least the event of its enqueue.
    if rows.is_empty() {
        return Err(Error::ActionNotFound(id.clone()));
    }
    rows.into_iter().map(HistoryRow::into_entry).collect()
}

/// A page of a watch's snapshot: the parent (first page only), then its
/// children in (created_at, name) order after `after`. `time` binds a time
/// as the backend stores it.
pub(crate) async fn snapshot<DB, T>(
    pool: &Pool<DB>,
    parent: &ActionId,
    after: Option<&SnapshotPosition>,
    limit: usize,
    time: fn(DateTime<Utc>) -> T,
    db_error: DbError,
) -> Result<Page<ActionState, SnapshotPosition>, Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    Option<T>: for<'q> Encode<'q, DB> + Type<DB>,
    bool: for<'q> Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    T: Send,
    SnapshotRow: for<'r> FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT {}, created_at FROM actions \
         WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 \
           AND ((NOT $6 AND name = $5) OR (parent_name = $5 \
             AND ($7 IS NULL OR (created_at, name) > ($7, $8)))) \
         ORDER BY name = $5 DESC, created_at, name LIMIT $9",
        state_columns!()
    );
    let rows = sqlx::query(&sql)
        .bind_id(parent)
        .bind(after.is_some())
        .bind(after.map(|a| time(a.created_at)))
        .bind(after.map(|a| a.name.as_str()))
        .bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
        .fetch(pool);
    let rows = read_bounded(
        rows,
        |row| SnapshotRow::from_row(row).map_err(db_error)?.into_entry(),
        |(state, _)| state.approximate_size(),
        limit,
        db_error,
    )
    .await?;
    snapshot_page(parent, after.is_none(), rows, limit)
}

/// The feed batch of `rows` (events after `cursor`, in feed order, at most
/// `limit`); `pending` as the backend found it.
pub(crate) fn feed_batch(
    cursor: FeedCursor,
    rows: Vec<FeedRow>,
    limit: usize,
    pending: bool,
) -> Result<FeedBatch, Error> {
    let mut batch = FeedBatch {
        cursor,
        more: rows.len() >= limit,
        pending,
        events: Vec::with_capacity(rows.len()),
        written_micros: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        batch.cursor = FeedCursor {
            major: row.major,
            minor: row.minor,
        };
        batch.events.push(row.state.into_state()?);
        batch.written_micros.push(row.written_micros);
    }
    Ok(batch)
}
