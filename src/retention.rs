//! Retention: deletes finished runs (root terminal, every action terminal)
//! once their root ended `retention.period` ago, with their actions and
//! events, in small batches with a pause between them, so writers never
//! queue behind a long delete.

use std::time::Instant;

use ::metrics::{counter, histogram};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionConfig;
use crate::domain::Error;
use crate::metrics::names;
use crate::store::{Deleted, Store};

/// Runs a pass at start-up and then every `interval` until `shutdown`.
pub async fn run(
    store: std::sync::Arc<dyn Store>,
    config: RetentionConfig,
    shutdown: CancellationToken,
) {
    loop {
        match pass(store.as_ref(), &config, &shutdown).await {
            Ok(deleted) if deleted.runs > 0 => info!(
                runs = deleted.runs,
                actions = deleted.actions,
                events = deleted.events,
                "retention pass deleted finished runs"
            ),
            Ok(_) => {}
            Err(err) => {
                counter!(names::RETENTION_FAILURES).increment(1);
                warn!(error = %err, "retention pass failed; retrying at the next interval");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.interval) => {}
            () = shutdown.cancelled() => break,
        }
    }
}

/// One pass: batches of `batch_size` runs that finished before now minus
/// `period` (fixed when the pass starts), until a batch comes back short
/// or `shutdown` fires.
pub async fn pass(
    store: &dyn Store,
    config: &RetentionConfig,
    shutdown: &CancellationToken,
) -> Result<Deleted, Error> {
    let started = Instant::now();
    let period = chrono::Duration::from_std(config.period)
        .map_err(|_| Error::invalid("retention.period", "too long"))?;
    let cutoff = Utc::now() - period;
    let mut total = Deleted::default();
    while !shutdown.is_cancelled() {
        let deleted = store
            .delete_finished_runs(cutoff, config.batch_size)
            .await?;
        record(deleted);
        total += deleted;
        if deleted.runs < config.batch_size as u64 {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(config.batch_pause) => {}
            () = shutdown.cancelled() => break,
        }
    }
    counter!(names::RETENTION_PASSES).increment(1);
    histogram!(names::RETENTION_DURATION).record(started.elapsed().as_secs_f64());
    Ok(total)
}

/// Counts deleted rows by kind.
pub fn record(deleted: Deleted) {
    counter!(names::RETENTION_DELETED, "kind" => "runs").increment(deleted.runs);
    counter!(names::RETENTION_DELETED, "kind" => "actions").increment(deleted.actions);
    counter!(names::RETENTION_DELETED, "kind" => "events").increment(deleted.events);
}
