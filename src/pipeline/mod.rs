//! The event pipeline: store event log → feed → sharded workers →
//! subscribers → WatchForUpdates streams.
//!
//! - The feed reads every committed event exactly once (see
//!   `Store::read_feed`), woken by local writes, by peers through the
//!   store's listener, and by a slow fallback poll.
//! - Each event goes to one of N workers chosen by a hash of the action's
//!   id, so all events of one action are handled by one worker, in order.
//! - Workers hand events to the subscribers registered for the action's
//!   parent and for the action itself. Each subscriber keeps only the
//!   latest state per action, so a slow stream costs memory bounded by its
//!   number of children and never blocks a worker.

mod executors;
mod feed;
mod position;
mod registry;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use executors::{ExecutorRegistry, LeaseRegistration};
pub use registry::{Registry, Subscription};

use crate::domain::Error;
use crate::store::Store;

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Number of shard workers.
    pub workers: usize,
    /// Capacity of each worker's queue.
    pub worker_queue: usize,
    /// Events read per feed query.
    pub batch_size: usize,
    /// Fallback poll when no wake-up arrives.
    pub poll_interval: Duration,
    /// Peers are notified at most once per this interval.
    pub notify_interval: Duration,
    /// Open streams end with UNAVAILABLE after the feed has failed this long.
    pub unavailable_after: Duration,
}

/// Wakes the feed of this daemon at once, and the feeds of other daemons
/// through the store's notification channel (at most once per
/// `notify_interval`, never inside a write transaction).
#[derive(Clone, Default)]
pub struct Waker {
    local: Arc<Notify>,
    peers: Arc<Notify>,
    executors: Arc<ExecutorRegistry>,
}

impl Waker {
    /// Called after a write committed events.
    pub fn wake(&self) {
        self.local.notify_one();
        self.peers.notify_one();
    }

    /// Called after an Enqueue of a queued task action committed (on
    /// `queue`, or on its run's queue when `None`): this daemon's lease
    /// streams claim at once instead of after the event comes through the
    /// feed, which may wait behind other transactions still running. A
    /// wake-up is only a hint, so waking too many streams costs a claim
    /// that finds nothing; the feed still wakes every daemon's streams.
    pub fn queued(&self, queue: Option<&str>) {
        self.executors.wake_queue(queue);
    }
}

/// The running pipeline.
pub struct Pipeline {
    registry: Arc<Registry>,
    executors: Arc<ExecutorRegistry>,
    waker: Waker,
    /// Stops the feed, which then drains into the workers.
    stop_feed: CancellationToken,
    feed: JoinSet<()>,
    /// Stops the listener and the peer notifier.
    stop_aux: CancellationToken,
    aux: JoinSet<()>,
}

impl Pipeline {
    /// Positions the feed after everything committed so far and starts the
    /// feed, the workers, the listener and the peer notifier.
    pub async fn start(store: Arc<dyn Store>, settings: PipelineSettings) -> Result<Self, Error> {
        let registry = Arc::new(Registry::default());
        let executors = Arc::new(ExecutorRegistry::default());
        let waker = Waker {
            executors: executors.clone(),
            ..Waker::default()
        };
        let cursor = store.feed_start().await?;

        let stop_feed = CancellationToken::new();
        let stop_aux = CancellationToken::new();
        let mut aux = JoinSet::new();
        aux.spawn(feed::listen(
            store.clone(),
            waker.local.clone(),
            stop_aux.clone(),
        ));
        aux.spawn(feed::notify_peers(
            store.clone(),
            waker.peers.clone(),
            settings.notify_interval,
            stop_aux.clone(),
        ));

        let mut feed = JoinSet::new();
        feed.spawn(feed::run(
            store,
            cursor,
            registry.clone(),
            executors.clone(),
            waker.local.clone(),
            settings,
            stop_feed.clone(),
        ));
        Ok(Self {
            registry,
            executors,
            waker,
            stop_feed,
            feed,
            stop_aux,
            aux,
        })
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn executors(&self) -> Arc<ExecutorRegistry> {
        self.executors.clone()
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Reads what is left in the event log, delivers it, then ends every
    /// stream with UNAVAILABLE. Call after in-flight writes have finished.
    pub async fn shutdown(mut self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        self.stop_feed.cancel();
        if tokio::time::timeout_at(until, async {
            while self.feed.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("event feed did not drain before the shutdown deadline");
        }
        self.registry.close_all("actionsd is shutting down");
        self.stop_aux.cancel();
        // The listener and notifier may be stuck on a silent database:
        // whatever has not stopped by the deadline is aborted.
        if tokio::time::timeout_at(until, async {
            while self.aux.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("the event listener did not stop before the shutdown deadline");
            self.aux.abort_all();
        }
    }
}
