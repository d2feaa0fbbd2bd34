//! The action store: where actions and their event log live.
//!
//! The [`Store`] trait speaks domain types only, so backends can be swapped
//! (Postgres today, an embedded backend later) without touching the RPC
//! layer or the pipeline.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::domain::{ActionId, ActionState, Command, Error, Event};

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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies one command in one transaction. Returns how many events it
    /// appended: 0 means accepted with nothing to change.
    ///
    /// Returning `Ok` means committed.
    async fn execute(&self, command: Command) -> Result<usize, Error>;

    /// The action and its direct children, the action first.
    async fn watch_snapshot(&self, parent: &ActionId) -> Result<Vec<ActionState>, Error>;

    /// A cursor after every event committed so far.
    async fn feed_start(&self) -> Result<FeedCursor, Error>;

    /// Reads up to `limit` committed events after `cursor`, in an order
    /// where no committed event is ever skipped.
    async fn read_feed(&self, cursor: FeedCursor, limit: usize) -> Result<FeedBatch, Error>;

    /// Tells other daemons that new events were committed.
    async fn notify_peers(&self) -> Result<(), Error>;

    /// Opens the wake-up channel from other daemons, if the backend has one.
    async fn listen(&self) -> Result<Option<Box<dyn PeerListener>>, Error>;

    /// Checks that the store can be reached (for health checks).
    async fn ping(&self) -> Result<(), Error>;

    /// Closes the store's connections, waiting for those in use.
    async fn close(&self);
}
