//! The feed's position, recorded in the store so that retention never
//! deletes an event this daemon has not read yet (see
//! `Store::record_feed_position`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::store::{FeedCursor, Store};

/// How often a running feed records its position.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// How long a recorded position holds events back: a daemon that stopped
/// recording (killed, partitioned) pins nothing after this.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// How long recording may take before the feed goes on without it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Position {
    store: Arc<dyn Store>,
    daemon: String,
    recorded: Option<Instant>,
}

impl Position {
    /// Records the start position before the feed reads anything.
    pub(super) async fn start(store: Arc<dyn Store>, cursor: FeedCursor) -> Self {
        let daemon = format!("{:016x}", rand::random::<u64>());
        let mut position = Self {
            store,
            daemon,
            recorded: None,
        };
        position.write(Some(cursor)).await;
        position.recorded = Some(Instant::now());
        position
    }

    /// Records `cursor` in the background if the last record is
    /// `INTERVAL` old; the feed never waits for it.
    pub(super) fn advance(&mut self, cursor: FeedCursor) {
        if self.recorded.is_some_and(|at| at.elapsed() < INTERVAL) {
            return;
        }
        self.recorded = Some(Instant::now());
        let (store, daemon) = (self.store.clone(), self.daemon.clone());
        tokio::spawn(async move {
            let write = store.record_feed_position(&daemon, Some(cursor), TTL);
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!(error = %err, "cannot record the feed position"),
                Err(_) => warn!("recording the feed position timed out"),
            }
        });
    }

    /// Removes the position when the feed stops.
    pub(super) async fn stop(self) {
        self.write(None).await;
    }

    async fn write(&self, cursor: Option<FeedCursor>) {
        let write = self.store.record_feed_position(&self.daemon, cursor, TTL);
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "cannot record the feed position"),
            Err(_) => warn!("recording the feed position timed out"),
        }
    }
}
