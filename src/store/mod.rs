//! The action store: where actions and their event log live.
//!
//! The [`Store`] trait speaks domain types only, so backends can be swapped
//! (Postgres today, an embedded backend later) without touching the RPC
//! layer or the pipeline.

/// The columns of an action's observable state (of `actions` or of
/// `events`), in `rows::StateRow` order.
macro_rules! state_columns {
    () => {
        "org, project, domain, run_name, name, parent_name, version, phase, attempt, output_uri, error, value, queue, lease_holder, kind, run_output_base, address"
    };
}

#[macro_use]
mod shared;

mod apply;
mod lease;
mod listing;
pub mod postgres;
mod read;
pub mod sqlite;

use async_trait::async_trait;
use bytes::Bytes;

use crate::domain::{
    ActionFilter, ActionId, ActionPosition, ActionRecord, ActionState, ClaimRequest, Command,
    Error, Event, HeartbeatOutcome, HistoryEntry, Lease, Page, PageRequest, ReapOutcome,
    ReapSettings, RunFilter, RunId, RunPosition, RunRecord, SnapshotPosition,
};

/// A position in the event log. Its meaning is the backend's: for
/// Postgres it is (transaction id, sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct FeedCursor {
    pub major: i64,
    pub minor: i64,
}

/// Events read from the log after a cursor.
#[derive(Debug, Default)]
pub struct FeedBatch {
    /// Committed events, each read once.
    pub events: Vec<Event>,
    /// When each event was written (its transaction's time), in
    /// microseconds since the epoch, one per event: the feed lag's start.
    pub written_micros: Vec<i64>,
    /// Where the next read starts.
    pub cursor: FeedCursor,
    /// The batch was full: read again at once.
    pub more: bool,
    /// Committed events exist that cannot be read yet without risking a
    /// gap (an older transaction is still running): read again soon.
    pub pending: bool,
}

/// What a [`PeerListener`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSignal {
    /// Another daemon (or this one) wrote events.
    Notified,
    /// The listening connection was lost and has been re-established;
    /// notifications may have been missed meanwhile.
    Reconnected,
}

/// Wake-ups from other daemons sharing the store.
#[async_trait]
pub trait PeerListener: Send {
    async fn next(&mut self) -> Result<PeerSignal, Error>;
}

/// What the read API asks of a store. Reads only; each call sees one
/// consistent snapshot of the store.
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// One action, or `ActionNotFound`.
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error>;

    /// Actions matching `filter`, in the order (created_at, org, project,
    /// domain, run, name), from after `page.after`.
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error>;

    /// Runs matching `filter`, newest first, with their phase counts.
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest<RunPosition>,
    ) -> Result<Page<RunRecord, RunPosition>, Error>;

    /// Every event of one action, oldest first, or `ActionNotFound`.
    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error>;

    /// The RunSpec a run's root was enqueued with (empty when none was
    /// given), or `RunNotFound`.
    async fn run_spec(&self, run: &RunId) -> Result<Bytes, Error>;

    /// The executor's live leases of unfinished actions, oldest first. A new
    /// lease stream re-sends them: a lease pushed on a stream that broke
    /// before the executor read it would otherwise be kept alive by its
    /// heartbeats without ever running.
    async fn leases_of(&self, executor: &str) -> Result<Vec<Lease>, Error>;

    /// A page of the action and its direct children: the action first
    /// (`ActionNotFound` when it does not exist), then its children in the
    /// order (created_at, name), from after `after`. At most `limit` states
    /// and about [`crate::domain::PAGE_BUDGET`] bytes per page.
    async fn watch_snapshot(
        &self,
        parent: &ActionId,
        after: Option<&SnapshotPosition>,
        limit: usize,
    ) -> Result<Page<ActionState, SnapshotPosition>, Error>;
}

/// What operations ask of a store: retention and the purge of deleted
/// runs' blobs, feed positions, health and occupancy.
#[async_trait]
pub trait Housekeeping: Send + Sync + 'static {
    /// Checks that the store can be reached (for health checks).
    async fn ping(&self) -> Result<(), Error>;

    /// One retention batch: deletes up to `limit` runs whose root action
    /// ended before `finished_before` and whose every action is terminal,
    /// with their actions and events, in one short transaction. Runs locked
    /// by a writer are skipped (left for the next pass).
    async fn delete_finished_runs(
        &self,
        finished_before: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Deleted, Error>;

    /// Deletes one run with its actions and events: `RunNotFound`, or
    /// `FailedPrecondition` while any action of it is not terminal.
    async fn delete_run(&self, run: &RunId) -> Result<Deleted, Error>;

    /// Records how far `daemon`'s event feed has read (`None`: it stopped
    /// reading), valid for `ttl`. Retention deletes a run's events only
    /// once every unexpired position is past all of them.
    async fn record_feed_position(
        &self,
        daemon: &str,
        cursor: Option<FeedCursor>,
        ttl: std::time::Duration,
    ) -> Result<(), Error>;

    /// Up to `limit` deleted runs whose blobs and logs are still to be
    /// deleted from the blob store, oldest first.
    async fn pending_purges(&self, limit: usize) -> Result<Vec<RunId>, Error>;

    /// Marks a deleted run's blobs and logs as deleted.
    async fn purged(&self, run: &RunId) -> Result<(), Error>;

    /// The connection pool's occupancy, for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Queued task actions of the `limit` fullest queues, and live leases,
    /// for metrics.
    async fn queue_stats(&self, limit: usize) -> Result<QueueStats, Error>;
}

#[async_trait]
pub trait Store: ReadStore + Housekeeping {
    /// Applies one command in one transaction. Returns how many events it
    /// appended: 0 means accepted with nothing to change.
    ///
    /// Returning `Ok` means committed.
    async fn execute(&self, command: Command) -> Result<usize, Error>;

    /// A cursor after every event committed so far.
    async fn feed_start(&self) -> Result<FeedCursor, Error>;

    /// Reads up to `limit` committed events after `cursor`, in an order
    /// where no committed event is ever skipped.
    async fn read_feed(&self, cursor: FeedCursor, limit: usize) -> Result<FeedBatch, Error>;

    /// Tells other daemons that new events were committed.
    async fn notify_peers(&self) -> Result<(), Error>;

    /// Opens the wake-up channel from other daemons, if the backend has one.
    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error>;

    /// Leases queued task actions of `request.queue` to the executor,
    /// oldest first, up to its free capacity and within each run's
    /// `max_action_concurrency`; each moves to INITIALIZING with an event.
    /// Safe with any number of claimers on any number of daemons: an attempt
    /// is leased once.
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Lease>, Error>;

    /// Extends the executor's live leases by `ttl` and releases those whose
    /// action became terminal, reporting the aborted ones (once).
    async fn heartbeat(
        &self,
        executor: &str,
        ttl: std::time::Duration,
    ) -> Result<HeartbeatOutcome, Error>;

    /// One reaper pass: requeues (attempt + 1) or fails actions whose lease
    /// expired, and times out conditions past their deadline. Safe when
    /// several daemons reap at once.
    async fn reap(&self, settings: &ReapSettings) -> Result<ReapOutcome, Error>;

    /// Closes the store's connections, waiting for those in use.
    async fn close(&self);
}

mod commit;
#[cfg(test)]
mod conformance;
mod rows;
mod sql;
pub use commit::GroupCommit;

/// Compares the migrations a database has applied with those built in:
/// fails naming the pending ones (not applied yet) and the unknown ones
/// (applied by a newer actionsd).
pub fn check_applied(applied: &[i64], migrator: &sqlx::migrate::Migrator) -> Result<(), String> {
    let known: Vec<i64> = migrator.iter().map(|m| m.version).collect();
    let pending: Vec<i64> = known
        .iter()
        .copied()
        .filter(|v| !applied.contains(v))
        .collect();
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    let mut problems = Vec::new();
    if !pending.is_empty() {
        problems.push(format!(
            "pending migrations {pending:?} (run `actionsd migrate`)"
        ));
    }
    if !unknown.is_empty() {
        problems.push(format!(
            "unknown migrations {unknown:?} (applied by a newer actionsd)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("the database has {}", problems.join(" and ")))
    }
}

/// What a deletion removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub runs: u64,
    pub actions: u64,
    pub events: u64,
}

impl std::ops::AddAssign for Deleted {
    fn add_assign(&mut self, other: Self) {
        self.runs += other.runs;
        self.actions += other.actions;
        self.events += other.events;
    }
}

/// Queued task actions of one queue.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    pub queue: String,
    pub queued: i64,
    /// When the oldest queued action was created.
    pub oldest: chrono::DateTime<chrono::Utc>,
}

/// What waits for executors, and what they hold.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub queues: Vec<QueueDepth>,
    /// Live leases (held by an executor, not yet released).
    pub leases_held: i64,
}

/// Connections of a store's pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    /// Open connections (idle or in use).
    pub open: u32,
    /// Idle connections.
    pub idle: u32,
    /// The pool's limit.
    pub max: u32,
}

/// Runs every write of the store it wraps in a task of its own, so a write
/// always reaches commit or rollback, even when the request that started it
/// is cancelled — a client that disconnects mid-call, or a lease stream
/// dropped while claiming. A cancelled future would otherwise abandon its
/// transaction half-way, holding locks until the connection is reused.
pub struct Detached {
    inner: std::sync::Arc<dyn Store>,
}

impl Detached {
    pub fn new(inner: std::sync::Arc<dyn Store>) -> Self {
        Self { inner }
    }

    async fn spawn<T, F>(
        &self,
        write: impl FnOnce(std::sync::Arc<dyn Store>) -> F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, Error>> + Send + 'static,
    {
        // In the caller's span, so the write's spans join the request's
        // trace.
        tokio::spawn(tracing::Instrument::in_current_span(write(
            self.inner.clone(),
        )))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "store write task failed");
            Error::Internal("store write failed".to_owned())
        })?
    }
}

#[async_trait]
impl ReadStore for Detached {
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error> {
        self.inner.get_action(id).await
    }

    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error> {
        self.inner.list_actions(filter, page).await
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest<RunPosition>,
    ) -> Result<Page<RunRecord, RunPosition>, Error> {
        self.inner.list_runs(filter, page).await
    }

    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error> {
        self.inner.history(id).await
    }

    async fn run_spec(&self, run: &RunId) -> Result<Bytes, Error> {
        self.inner.run_spec(run).await
    }

    async fn leases_of(&self, executor: &str) -> Result<Vec<Lease>, Error> {
        self.inner.leases_of(executor).await
    }

    async fn watch_snapshot(
        &self,
        parent: &ActionId,
        after: Option<&SnapshotPosition>,
        limit: usize,
    ) -> Result<Page<ActionState, SnapshotPosition>, Error> {
        self.inner.watch_snapshot(parent, after, limit).await
    }
}

#[async_trait]
impl Housekeeping for Detached {
    async fn ping(&self) -> Result<(), Error> {
        self.inner.ping().await
    }

    async fn delete_finished_runs(
        &self,
        finished_before: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Deleted, Error> {
        self.spawn(|store| async move { store.delete_finished_runs(finished_before, limit).await })
            .await
    }

    async fn delete_run(&self, run: &RunId) -> Result<Deleted, Error> {
        let run = run.clone();
        self.spawn(|store| async move { store.delete_run(&run).await })
            .await
    }

    async fn record_feed_position(
        &self,
        daemon: &str,
        cursor: Option<FeedCursor>,
        ttl: std::time::Duration,
    ) -> Result<(), Error> {
        let daemon = daemon.to_owned();
        self.spawn(|store| async move { store.record_feed_position(&daemon, cursor, ttl).await })
            .await
    }

    async fn pending_purges(&self, limit: usize) -> Result<Vec<RunId>, Error> {
        self.inner.pending_purges(limit).await
    }

    async fn purged(&self, run: &RunId) -> Result<(), Error> {
        let run = run.clone();
        self.spawn(|store| async move { store.purged(&run).await })
            .await
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }

    async fn queue_stats(&self, limit: usize) -> Result<QueueStats, Error> {
        self.inner.queue_stats(limit).await
    }
}

#[async_trait]
impl Store for Detached {
    async fn execute(&self, command: Command) -> Result<usize, Error> {
        self.spawn(|store| async move { store.execute(command).await })
            .await
    }

    async fn feed_start(&self) -> Result<FeedCursor, Error> {
        self.inner.feed_start().await
    }

    async fn read_feed(&self, cursor: FeedCursor, limit: usize) -> Result<FeedBatch, Error> {
        self.inner.read_feed(cursor, limit).await
    }

    async fn notify_peers(&self) -> Result<(), Error> {
        self.inner.notify_peers().await
    }

    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error> {
        self.inner.listen().await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Lease>, Error> {
        let request = request.clone();
        self.spawn(|store| async move { store.claim(&request).await })
            .await
    }

    async fn heartbeat(
        &self,
        executor: &str,
        ttl: std::time::Duration,
    ) -> Result<HeartbeatOutcome, Error> {
        let executor = executor.to_owned();
        self.spawn(|store| async move { store.heartbeat(&executor, ttl).await })
            .await
    }

    async fn reap(&self, settings: &ReapSettings) -> Result<ReapOutcome, Error> {
        let settings = settings.clone();
        self.spawn(|store| async move { store.reap(&settings).await })
            .await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

/// Turns a database failure into a domain error: the failures of reaching
/// the database at all here, those a statement reports by `database`
/// (the backend's reading of its codes, `None` for one no rule expects).
/// The cause is logged here; clients see a short message.
fn map_db_error(
    err: sqlx::Error,
    database: impl FnOnce(&sqlx::Error, &dyn sqlx::error::DatabaseError) -> Option<Error>,
) -> Error {
    match &err {
        // A connection reset or cut mid-conversation surfaces as Io or,
        // when the server's bytes stop making sense, as Protocol.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => unavailable(&err),
        sqlx::Error::Database(db) => database(&err, db.as_ref()).unwrap_or_else(|| internal(&err)),
        _ => internal(&err),
    }
}

/// The database cannot be reached or cannot take the change now; it may
/// succeed later.
fn unavailable(err: &sqlx::Error) -> Error {
    tracing::warn!(error = %err, "database unavailable");
    Error::Unavailable("database unavailable; retry later".to_owned())
}

/// A database error no rule expects: logged here, reported without its
/// detail (it may name tables, values or paths).
fn internal(err: &sqlx::Error) -> Error {
    tracing::error!(error = %err, "store failure");
    Error::Internal("store failure".to_owned())
}

/// Builds a watch snapshot page from up to `limit + 1` rows read in order
/// (the parent first on the first page), each with its position.
pub(crate) fn snapshot_page(
    parent: &ActionId,
    first: bool,
    rows: Vec<(ActionState, SnapshotPosition)>,
    limit: usize,
) -> Result<Page<ActionState, SnapshotPosition>, Error> {
    if first && rows.first().is_none_or(|(s, _)| s.id.name != parent.name) {
        return Err(Error::ActionNotFound(parent.clone()));
    }
    let page = Page::from_overfetch_within(
        rows,
        limit.max(1),
        |(_, position)| position.clone(),
        |(state, _)| state.approximate_size(),
        crate::domain::PAGE_BUDGET,
    );
    // A page that ends with the parent continues with every child: the
    // parent's own position could pass over a child created in the same
    // instant.
    let ends_with_parent = page
        .items
        .last()
        .is_some_and(|(s, _)| first && s.id.name == parent.name);
    let next = page.next.map(|position| {
        if ends_with_parent {
            SnapshotPosition::start()
        } else {
            position
        }
    });
    Ok(Page {
        items: page.items.into_iter().map(|(state, _)| state).collect(),
        next,
    })
}

/// Reads `rows` until it holds one item more than `limit` or more than
/// `budget` bytes (as `size` counts them), then stops reading: a page's
/// memory stays near its budget whatever the rows hold. The caller builds
/// the page with [`Page::from_overfetch_within`].
pub(crate) async fn read_bounded<R, T, S>(
    mut rows: S,
    convert: impl Fn(&R) -> Result<T, Error>,
    size: impl Fn(&T) -> usize,
    limit: usize,
    db_error: fn(sqlx::Error) -> Error,
) -> Result<Vec<T>, Error>
where
    S: futures_util::Stream<Item = Result<R, sqlx::Error>> + Unpin,
{
    use futures_util::TryStreamExt;
    let mut items = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.try_next().await.map_err(db_error)? {
        let item = convert(&row)?;
        bytes = bytes.saturating_add(size(&item));
        items.push(item);
        if items.len() > limit || bytes > crate::domain::PAGE_BUDGET {
            break;
        }
    }
    Ok(items)
}
