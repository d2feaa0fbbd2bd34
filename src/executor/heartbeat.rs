//! Heartbeats: while the executor holds leases, extend them every
//! `heartbeat_interval` and pass on the cancellations the server reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::rpc;
use super::Context;
use crate::proto::actionsd::executor::v1::{Cancellation, HeartbeatRequest};

/// Runs until `stop`. `held` is the number of leases the executor holds;
/// nothing is sent while it is zero.
pub(super) async fn run(
    ctx: Arc<Context>,
    mut held: watch::Receiver<usize>,
    cancellations: mpsc::Sender<Cancellation>,
    stop: CancellationToken,
) {
    let interval = ctx.settings.heartbeat_interval;
    let mut warned = false;
    loop {
        let holding = tokio::select! {
            () = stop.cancelled() => return,
            held = held.wait_for(|n| *n > 0) => held.is_ok(),
        };
        if !holding {
            return;
        }
        // The first beat one interval after the first lease arrived.
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if *held.borrow() == 0 {
                break;
            }
            if !beat(&ctx, &cancellations, &stop, &mut warned).await {
                return;
            }
        }
    }
}

/// One heartbeat. False when the executor is stopping.
async fn beat(
    ctx: &Context,
    cancellations: &mpsc::Sender<Cancellation>,
    stop: &CancellationToken,
    warned: &mut bool,
) -> bool {
    let request = HeartbeatRequest {
        executor_id: ctx.settings.executor_id.clone(),
    };
    let mut client = ctx.executor.clone();
    let response = match rpc::call(client.heartbeat(rpc::request(request))).await {
        Ok(response) => response,
        Err(status) => {
            tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                "heartbeat failed; trying again next interval"
            );
            return true;
        }
    };
    let remaining = response
        .lease_deadline
        .and_then(|deadline| SystemTime::try_from(deadline).ok())
        .and_then(|deadline| deadline.duration_since(SystemTime::now()).ok());
    tracing::debug!(lease_remaining = ?remaining, cancelled = response.cancelled.len(), "heartbeat");
    if !*warned && too_slow(ctx.settings.heartbeat_interval, remaining) {
        *warned = true;
        tracing::warn!(
            heartbeat_interval = ?ctx.settings.heartbeat_interval,
            lease_remaining = ?remaining,
            "the heartbeat interval is long for the server's lease; one missed heartbeat may lose leases"
        );
    }
    for cancellation in response.cancelled {
        tokio::select! {
            () = stop.cancelled() => return false,
            sent = cancellations.send(cancellation) => if sent.is_err() {
                return false;
            },
        }
    }
    true
}

/// Whether two heartbeats in a row may miss before the lease expires.
fn too_slow(interval: Duration, lease_remaining: Option<Duration>) -> bool {
    lease_remaining.is_some_and(|remaining| interval.saturating_mul(2) > remaining)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_too_slow_when_two_beats_outlast_the_lease() {
        let s = Duration::from_secs;
        assert!(!too_slow(s(5), Some(s(30))));
        assert!(too_slow(s(20), Some(s(30))));
        assert!(!too_slow(s(20), None));
    }
}
