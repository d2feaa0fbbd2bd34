//! Attempt logs: what executors send through `ExecutorService/AppendLogs`,
//! kept in the blob store as numbered chunks, and streamed back by
//! `DataProxyService/TailLogs`.
//!
//! Each request of an executor is one chunk object
//! (`logs/…/<action>/<attempt>/<sequence>.pb`, an encoded
//! `TailLogsResponse.Logs`). Chunk names sort in sequence order, so any
//! daemon sharing the blob store reads a log by listing its directory: no
//! shared disk and no second copy in the database. A resent request has the
//! same sequence and replaces its chunk. Every attempt's log is bounded by
//! `logs.max_attempt_bytes` of line text; past it, lines are dropped and
//! the executor is told.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::Notify;

use crate::blob::{keys, Blobs};
use crate::domain::{ActionId, Error};
use crate::proto::flyteidl2::dataproxy::tail_logs_response::Logs;
use crate::proto::flyteidl2::logs::dataplane::LogLine;

/// Most chunks one attempt may have.
pub const MAX_CHUNKS: u32 = 100_000;

#[derive(Clone)]
pub struct LogStore {
    blobs: Blobs,
    /// Wakes the tails of this daemon when a chunk is written through it;
    /// tails also poll, for chunks written through other daemons.
    written: Arc<Notify>,
}

impl LogStore {
    pub fn new(blobs: Blobs) -> Self {
        Self {
            blobs,
            written: Arc::new(Notify::new()),
        }
    }

    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.written.notified()
    }

    /// Appends chunk `sequence` of an attempt's log. Returns false (and
    /// stores nothing) when the log would exceed its bound.
    pub async fn append(
        &self,
        id: &ActionId,
        attempt: u32,
        sequence: u32,
        lines: Vec<LogLine>,
    ) -> Result<bool, Error> {
        if sequence >= MAX_CHUNKS {
            return Ok(false);
        }
        let size: u64 = lines.iter().map(|l| l.message.len() as u64).sum();
        let dir = keys::log_dir(id, attempt);
        let existing = self.blobs.list(&dir).await?;
        let chunk = keys::log_chunk(id, attempt, sequence);
        // Stored bytes are a close upper bound of line text (a few bytes of
        // framing per line); a replaced chunk does not count twice.
        let used: u64 = existing
            .iter()
            .filter(|(path, _)| *path != chunk)
            .map(|(_, size)| *size)
            .sum();
        if used + size > self.blobs.limits.max_attempt_log_bytes {
            return Ok(false);
        }
        let body = Logs {
            lines,
            container: Bytes::new(),
        }
        .encode_to_vec();
        self.blobs.put(&chunk, Bytes::from(body)).await?;
        self.written.notify_waiters();
        Ok(true)
    }

    /// Whether an attempt has any log yet.
    pub async fn available(&self, id: &ActionId, attempt: u32) -> Result<bool, Error> {
        self.blobs.exists(&keys::log_chunk(id, attempt, 0)).await
    }

    /// The chunks of an attempt's log from index `from` on, in order.
    pub async fn read_from(
        &self,
        id: &ActionId,
        attempt: u32,
        from: usize,
    ) -> Result<Vec<Logs>, Error> {
        let listing = self.blobs.list(&keys::log_dir(id, attempt)).await?;
        let mut out = Vec::new();
        for (path, _) in listing.into_iter().skip(from) {
            let Some(bytes) = self
                .blobs
                .get(&path, self.blobs.limits.max_attempt_log_bytes * 2)
                .await?
            else {
                continue;
            };
            match Logs::decode(bytes) {
                Ok(logs) => out.push(logs),
                Err(err) => {
                    tracing::warn!(chunk = %path, error = %err, "skipping an unreadable log chunk");
                    out.push(Logs::default());
                }
            }
        }
        Ok(out)
    }
}
