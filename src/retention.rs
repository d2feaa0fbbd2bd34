//! Retention: deletes finished runs (root terminal, every action terminal)
//! once their root ended `retention.period` ago, with their actions and
//! events, in small batches with a pause between them, so writers never
//! queue behind a long delete. After each pass, the blobs and logs of
//! deleted runs (those of retention and of `actionsctl delete-run`) are
//! deleted from the blob store; a failure is retried at the next pass.

use std::time::Instant;

use ::metrics::{counter, histogram};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::blob::{keys, Blobs};
use crate::config::RetentionConfig;
use crate::domain::Error;
use crate::metrics::names;
use crate::store::{Deleted, Store};

/// Runs a pass at start-up and then every `interval` until `shutdown`.
/// With retention disabled, only the blobs of runs deleted by hand are
/// purged.
pub async fn run(
    store: std::sync::Arc<dyn Store>,
    blobs: Option<Blobs>,
    config: RetentionConfig,
    shutdown: CancellationToken,
) {
    loop {
        let outcome = if config.enabled {
            pass(store.as_ref(), &config, &shutdown).await
        } else {
            Ok(Deleted::default())
        };
        if let Some(blobs) = &blobs {
            if let Err(err) = purge(store.as_ref(), blobs, &shutdown).await {
                counter!(names::RETENTION_FAILURES).increment(1);
                warn!(error = %err, "deleting the blobs of deleted runs failed; retrying at the next interval");
            }
        }
        match outcome {
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

/// Runs purged per store read.
const PURGE_BATCH: usize = 100;

/// Deletes the blobs and logs of deleted runs (`runs/<run>/…` and
/// `logs/<run>/…` in the blob store), then forgets them. A run whose
/// objects cannot be deleted stays queued for the next pass. Returns how
/// many runs were purged.
pub async fn purge(
    store: &dyn Store,
    blobs: &Blobs,
    shutdown: &CancellationToken,
) -> Result<u64, Error> {
    let mut purged = 0;
    loop {
        let runs = store.pending_purges(PURGE_BATCH).await?;
        let mut failed = 0;
        for run in &runs {
            if shutdown.is_cancelled() {
                return Ok(purged);
            }
            let mut objects = 0;
            let mut result = Ok(());
            for prefix in [keys::run_base(run), keys::run_logs(run)] {
                match blobs.delete_prefix(&prefix).await {
                    Ok(n) => objects += n,
                    Err(err) => result = Err(err),
                }
            }
            match result {
                Ok(()) => {
                    store.purged(run).await?;
                    counter!(names::RETENTION_DELETED, "kind" => "blobs").increment(objects);
                    purged += 1;
                }
                Err(err) => {
                    failed += 1;
                    warn!(run = %run, error = %err, "cannot delete a deleted run's blobs; retrying at the next pass");
                }
            }
        }
        // Stop when the queue is drained or holds only runs that failed.
        if runs.len() < PURGE_BATCH || failed == runs.len() {
            return Ok(purged);
        }
    }
}

/// Counts deleted rows by kind.
pub fn record(deleted: Deleted) {
    counter!(names::RETENTION_DELETED, "kind" => "runs").increment(deleted.runs);
    counter!(names::RETENTION_DELETED, "kind" => "actions").increment(deleted.actions);
    counter!(names::RETENTION_DELETED, "kind" => "events").increment(deleted.events);
}
