//! Ships an attempt's output to actionsd (`ExecutorService/AppendLogs`),
//! so `DataProxyService/TailLogs` can stream it from any daemon without a
//! shared disk.
//!
//! The process's output is handed over in chunks from blocking reader
//! threads ([`LogShipper::write_chunk`] never blocks); a task splits it
//! into lines and sends batches of at most [`BATCH_BYTES`] bytes, at least
//! every [`FLUSH_EVERY`], each numbered so a retried request replaces
//! itself. Everything is bounded: at most [`QUEUE_CHUNKS`] chunks wait (more
//! are dropped and counted), a line longer than [`MAX_LINE`] is cut, a
//! request is retried a few times, and once the daemon answers that the
//! attempt's log is full, the rest is dropped.

use std::time::Duration;

use std::sync::{Mutex, PoisonError};

use crate::client::AuthChannel as Channel;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::rpc;
use crate::proto::actionsd::executor::v1::executor_service_client::ExecutorServiceClient;
use crate::proto::actionsd::executor::v1::AppendLogsRequest;
use crate::proto::flyteidl2::common::ActionIdentifier;
use crate::proto::flyteidl2::logs::dataplane::{LogLine, LogLineOriginator};

/// Chunks waiting to be shipped before more are dropped.
pub const QUEUE_CHUNKS: usize = 256;
/// Largest batch of line text per request.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Longest line; longer ones are cut.
pub const MAX_LINE: usize = 64 * 1024;
/// A partial batch is sent after this long.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The sending half: cheap to clone into the threads that read the
/// process's stdout and stderr.
#[derive(Clone)]
pub struct LogShipper {
    chunks: mpsc::Sender<Vec<u8>>,
}

/// The shipping task; [`ShipperTask::finish`] sends what is left.
pub struct ShipperTask {
    close: CancellationToken,
    handle: Mutex<Option<JoinHandle<ShipStats>>>,
}

/// What happened to an attempt's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipStats {
    pub lines_sent: u64,
    /// Lines dropped: a full log, or a daemon that did not answer.
    pub lines_dropped: u64,
}

impl LogShipper {
    /// Starts shipping the log of `attempt` of `action_id` for `executor_id`.
    pub fn start(
        client: ExecutorServiceClient<Channel>,
        executor_id: String,
        action_id: ActionIdentifier,
        attempt: u32,
    ) -> (Self, ShipperTask) {
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let close = CancellationToken::new();
        let handle = tokio::spawn(ship(
            rx,
            close.clone(),
            Target {
                client,
                executor_id,
                action_id,
                attempt,
            },
        ));
        (
            Self { chunks: tx },
            ShipperTask {
                close,
                handle: Mutex::new(Some(handle)),
            },
        )
    }

    /// Hands over output; never blocks. Returns false when it was dropped
    /// because the queue is full.
    pub fn write_chunk(&self, chunk: &[u8]) -> bool {
        self.chunks.try_send(chunk.to_vec()).is_ok()
    }
}

impl ShipperTask {
    /// Ends shipping once what was handed over so far is sent (waiting at
    /// most `timeout`); later output is dropped. Call it once the process
    /// has exited, before the attempt is reported finished, so a tail that
    /// ends with the attempt has every line.
    pub async fn finish(&self, timeout: Duration) -> ShipStats {
        self.close.cancel();
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else {
            return ShipStats::default();
        };
        match tokio::time::timeout(timeout, handle).await {
            Ok(Ok(stats)) => stats,
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("log shipping did not finish in time");
                ShipStats::default()
            }
        }
    }
}

struct Target {
    client: ExecutorServiceClient<Channel>,
    executor_id: String,
    action_id: ActionIdentifier,
    attempt: u32,
}

/// Splits chunks into lines, keeping an unfinished last line.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<LogLine>) {
        for &byte in chunk {
            if byte == b'\n' {
                out.push(line(std::mem::take(&mut self.partial)));
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(byte);
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<LogLine>) {
        if !self.partial.is_empty() {
            out.push(line(std::mem::take(&mut self.partial)));
        }
    }
}

/// One line; its message ends with a newline, as the Flyte SDK's log
/// viewer expects (it joins messages as they are).
fn line(bytes: Vec<u8>) -> LogLine {
    let mut message = String::from_utf8_lossy(&bytes).into_owned();
    if message.ends_with('\r') {
        message.pop();
    }
    message.push('\n');
    LogLine {
        timestamp: Some(crate::rpc::convert::timestamp_to_proto(chrono::Utc::now())),
        message,
        originator: LogLineOriginator::User as i32,
        short_pod_name: String::new(),
    }
}

async fn ship(
    mut rx: mpsc::Receiver<Vec<u8>>,
    close: CancellationToken,
    mut target: Target,
) -> ShipStats {
    let mut stats = ShipStats::default();
    let mut lines = Lines::default();
    let mut pending: Vec<LogLine> = Vec::new();
    let mut sequence = 0u32;
    let mut full = false;
    let mut open = true;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while open || !pending.is_empty() {
        let flush = tokio::select! {
            chunk = rx.recv(), if open => {
                match chunk {
                    Some(chunk) => lines.push(&chunk, &mut pending),
                    None => {
                        open = false;
                        lines.flush(&mut pending);
                    }
                }
                !open || pending.iter().map(|l| l.message.len()).sum::<usize>() >= BATCH_BYTES
            }
            _ = tick.tick() => true,
            () = close.cancelled(), if open => {
                // Take what is queued, then stop reading.
                while let Ok(chunk) = rx.try_recv() {
                    lines.push(&chunk, &mut pending);
                }
                open = false;
                lines.flush(&mut pending);
                true
            }
        };
        if !flush || pending.is_empty() {
            continue;
        }
        // One request at most BATCH_BYTES of text; the rest waits.
        let mut size = 0;
        let take = pending
            .iter()
            .take_while(|l| {
                size += l.message.len();
                size <= BATCH_BYTES
            })
            .count()
            .max(1);
        let batch: Vec<LogLine> = pending.drain(..take).collect();
        let count = batch.len() as u64;
        if full {
            stats.lines_dropped += count;
            continue;
        }
        match send(&mut target, sequence, batch).await {
            Some(false) => {
                stats.lines_sent += count;
                sequence += 1;
            }
            Some(true) => {
                full = true;
                stats.lines_dropped += count;
            }
            None => stats.lines_dropped += count,
        }
    }
    stats
}

/// Sends one batch (an idempotent call: a resend replaces itself);
/// `Some(truncated)` when the daemon answered.
async fn send(target: &mut Target, sequence: u32, lines: Vec<LogLine>) -> Option<bool> {
    let request = AppendLogsRequest {
        executor_id: target.executor_id.clone(),
        action_id: Some(target.action_id.clone()),
        attempt: target.attempt,
        sequence,
        lines,
    };
    let client = &target.client;
    let result = rpc::with_retries("AppendLogs", rpc::report_backoff(), || {
        let mut client = client.clone();
        let request = request.clone();
        async move { rpc::call(client.append_logs(rpc::request(request))).await }
    })
    .await;
    match result {
        Ok(response) => Some(response.truncated),
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "cannot ship log lines");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_into_lines() {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        lines.push(b"one\ntw", &mut out);
        lines.push(b"o\r\nthree", &mut out);
        assert_eq!(
            out.iter().map(|l| l.message.as_str()).collect::<Vec<_>>(),
            ["one\n", "two\n"]
        );
        lines.flush(&mut out);
        assert_eq!(out.last().unwrap().message, "three\n");
        let mut long = Vec::new();
        lines.push(&vec![b'x'; MAX_LINE + 10], &mut long);
        lines.push(b"\n", &mut long);
        assert_eq!(long[0].message.len(), MAX_LINE + 1);
    }
}
