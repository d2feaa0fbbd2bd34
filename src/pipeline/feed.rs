//! The feed: reads the event log and shards events to the workers.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ExecutorRegistry, PipelineSettings, Registry};
use crate::domain::{ActionId, Event};
use crate::store::{FeedCursor, PeerSignal, Store};

/// How long the final drain at shutdown keeps waiting for events of
/// transactions that are still committing.
const FINAL_DRAIN: Duration = Duration::from_secs(2);
/// First delay before re-reading when events wait behind a running
/// transaction; doubles up to the poll interval.
const PENDING_RETRY: Duration = Duration::from_millis(1);
/// Retry delay after a failed read; doubles up to `MAX_RETRY`.
const ERROR_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// The shard of an action: a stable hash of its full id.
fn shard_of(id: &ActionId, shards: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    // The modulo is below `shards`, which is a usize.
    (hasher.finish() % shards as u64) as usize
}

pub(super) async fn run(
    store: Arc<dyn Store>,
    mut cursor: FeedCursor,
    registry: Arc<Registry>,
    executors: Arc<ExecutorRegistry>,
    wake: Arc<Notify>,
    settings: PipelineSettings,
    stop: CancellationToken,
) {
    let workers = settings.workers.max(1);
    let mut shards = Vec::with_capacity(workers);
    let mut worker_tasks = JoinSet::new();
    for _ in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(Arc<Event>, i64)>(settings.worker_queue.max(1));
        let registry = registry.clone();
        let executors = executors.clone();
        worker_tasks.spawn(async move {
            while let Some((event, written_micros)) = rx.recv().await {
                registry.publish(&event);
                executors.publish(&event);
                let lag = chrono::Utc::now().timestamp_micros() - written_micros;
                ::metrics::histogram!(crate::metrics::names::FEED_LAG)
                    .record(lag.max(0) as f64 / 1e6);
            }
        });
        shards.push(tx);
    }

    let mut position = super::position::Position::start(store.clone(), cursor).await;
    let mut pending_retry = PENDING_RETRY;
    let mut error_retry = ERROR_RETRY;
    let mut failing_since: Option<Instant> = None;
    let mut final_drain: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let wait = match store.read_feed(cursor, settings.batch_size).await {
            Ok(batch) => {
                if failing_since.take().is_some() {
                    info!("event feed recovered");
                }
                error_retry = ERROR_RETRY;
                cursor = batch.cursor;
                position.advance(cursor);
                ::metrics::counter!(crate::metrics::names::FEED_EVENTS)
                    .increment(batch.events.len() as u64);
                for (event, written) in batch.events.into_iter().zip(batch.written_micros) {
                    let shard = shard_of(&event.id, workers);
                    // A worker only ends when its sender is dropped.
                    let _ = shards[shard].send((Arc::new(event), written)).await;
                }
                if batch.more {
                    continue;
                }
                if final_drain.is_some() && !batch.pending {
                    break;
                }
                if batch.pending {
                    let wait = pending_retry;
                    pending_retry = (pending_retry * 2).min(settings.poll_interval);
                    wait
                } else {
                    pending_retry = PENDING_RETRY;
                    settings.poll_interval
                }
            }
            Err(err) => {
                // Counted from the start of the first failed read: a read
                // that timed out was failing all along.
                let since = *failing_since.get_or_insert(started);
                warn!(error = %err, "event feed read failed");
                ::metrics::counter!(crate::metrics::names::FEED_FAILURES).increment(1);
                if since.elapsed() >= settings.unavailable_after {
                    registry.close_all("event feed unavailable; reconnect to resynchronise");
                }
                if final_drain.is_some() {
                    break;
                }
                let wait = error_retry;
                error_retry = (error_retry * 2).min(MAX_RETRY);
                wait
            }
        };
        if let Some(started) = final_drain {
            if started.elapsed() >= FINAL_DRAIN {
                warn!("events of still-running transactions were not delivered before shutdown");
                break;
            }
            tokio::time::sleep(wait.min(Duration::from_millis(10))).await;
            continue;
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => {
                debug!("event feed draining for shutdown");
                final_drain = Some(Instant::now());
            }
        }
    }
    drop(shards);
    while worker_tasks.join_next().await.is_some() {}
    position.stop().await;
}

/// Forwards wake-ups from other daemons to the feed. Reconnects when the
/// listening connection is lost; the feed then catches up from its cursor,
/// so nothing committed meanwhile is missed.
pub(super) async fn listen(store: Arc<dyn Store>, wake: Arc<Notify>, stop: CancellationToken) {
    let mut retry = ERROR_RETRY;
    let mut listener = loop {
        let attempt = tokio::select! {
            result = store.listen() => result,
            () = stop.cancelled() => return,
        };
        match attempt {
            Ok(Some(listener)) => break listener,
            Ok(None) => return,
            Err(err) => {
                warn!(error = %err, "cannot open the event feed listener; retrying");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stop.cancelled() => return,
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    };
    retry = ERROR_RETRY;
    loop {
        let signal = tokio::select! {
            signal = listener.next() => signal,
            () = stop.cancelled() => return,
        };
        match signal {
            Ok(PeerSignal::Notified) => {
                retry = ERROR_RETRY;
                wake.notify_one();
            }
            Ok(PeerSignal::Reconnected) => {
                info!("event feed listener reconnected; catching up");
                retry = ERROR_RETRY;
                wake.notify_one();
            }
            Err(err) => {
                warn!(error = %err, "event feed listener failed; retrying");
                wake.notify_one();
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stop.cancelled() => return,
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Notifies other daemons after local writes, at most once per `interval`.
pub(super) async fn notify_peers(
    store: Arc<dyn Store>,
    dirty: Arc<Notify>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = dirty.notified() => {}
            () = stop.cancelled() => return,
        }
        if let Err(err) = store.notify_peers().await {
            warn!(error = %err, "cannot notify other daemons");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        let id = ActionId::in_test_run("a1");
        let first = shard_of(&id, 16);
        assert!(first < 16);
        assert_eq!(first, shard_of(&id.clone(), 16));
    }
}
