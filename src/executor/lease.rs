//! The lease stream: opened for the executor's queue and capacity, read
//! until it fails or ends, then opened again after a backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::rpc::{self, Backoff};
use super::Context;
use crate::proto::actionsd::executor::v1::{
    lease_response, Cancellation, LeaseRequest, LeasedAction,
};

/// A stream that lived at least this long was healthy: the next reconnect
/// starts again from the shortest backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(10);

/// What the lease stream delivers.
#[derive(Debug)]
pub(super) enum LeaseEvent {
    Leased(LeasedAction),
    Cancelled(Cancellation),
}

/// Why a stream stopped.
enum End {
    /// The executor is stopping; the stream was dropped.
    Stopped,
    /// The server ended the stream, or it failed.
    Lost(tonic::Status),
}

/// Keeps a lease stream open until `stop`, forwarding what it delivers to
/// `events`. Dropping the stream is how the server learns that no more
/// work should come. Every event already received is forwarded, even when
/// stopping: those leases are the executor's to run.
pub(super) async fn run(
    ctx: Arc<Context>,
    events: mpsc::Sender<LeaseEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let opened = Instant::now();
        let (delivered, end) = session(&ctx, &events, &stop).await;
        let status = match end {
            End::Stopped => return,
            End::Lost(status) => status,
        };
        if delivered || opened.elapsed() >= HEALTHY_STREAM {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            code = ?status.code(),
            message = status.message(),
            retry_in = ?delay,
            "lease stream lost; reconnecting"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One lease stream, from opening to its end. Also says whether it
/// delivered anything.
async fn session(
    ctx: &Context,
    events: &mpsc::Sender<LeaseEvent>,
    stop: &CancellationToken,
) -> (bool, End) {
    let request = LeaseRequest {
        executor_id: ctx.settings.executor_id.clone(),
        queue: ctx.settings.queue.clone(),
        capacity: ctx.settings.capacity,
        max_leases: ctx.settings.max_processes,
    };
    let mut client = ctx.executor.clone();
    // Only the opening has a deadline: the stream itself lives as long as
    // the executor leases, and HTTP/2 keep-alive pings notice a dead peer.
    let opening = tokio::time::timeout(rpc::CALL_TIMEOUT, client.lease(request));
    let mut stream = tokio::select! {
        () = stop.cancelled() => return (false, End::Stopped),
        opened = opening => match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return (false, End::Lost(status)),
            Err(_) => {
                let status = tonic::Status::deadline_exceeded("lease stream not opened in time");
                return (false, End::Lost(status));
            }
        },
    };
    tracing::info!(queue = %ctx.settings.queue, capacity = ctx.settings.capacity, "leasing");
    let mut delivered = false;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return (delivered, End::Stopped),
            message = stream.message() => message,
        };
        let event = match message {
            Ok(Some(response)) => match response.event {
                Some(lease_response::Event::Leased(leased)) => LeaseEvent::Leased(leased),
                Some(lease_response::Event::Cancelled(cancelled)) => {
                    LeaseEvent::Cancelled(cancelled)
                }
                None => continue,
            },
            Ok(None) => {
                let status = tonic::Status::unavailable("the server ended the lease stream");
                return (delivered, End::Lost(status));
            }
            Err(status) => return (delivered, End::Lost(status)),
        };
        delivered = true;
        // Not raced against `stop`: a received lease is never dropped here.
        if events.send(event).await.is_err() {
            return (delivered, End::Stopped);
        }
    }
}
