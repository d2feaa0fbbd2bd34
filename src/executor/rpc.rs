//! Calling actionsd: timeouts on every call, bounded retries, backoff.

use std::future::Future;
use std::time::Duration;

use tonic::{Code, Request, Response, Status};

/// The deadline of every unary call.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a reporting call (Update, Finish) is tried in all.
const REPORT_TRIES: u32 = 5;

/// Exponential backoff: each delay doubles, from `initial` up to `max`.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the following one is twice as long.
    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    pub(super) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A unary request whose deadline the server sees too (`grpc-timeout`).
pub(super) fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Awaits a unary call for at most [`CALL_TIMEOUT`].
pub(super) async fn call<T>(
    response: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, response).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("no answer from actionsd in time")),
    }
}

/// Whether a failed call may succeed when tried again unchanged.
fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// The pauses between tries of a reporting call: 0.5 s, 1 s, 2 s, 4 s.
pub(super) fn report_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(5))
}

/// Runs `attempt` until it succeeds, fails for good, or has been tried
/// [`REPORT_TRIES`] times; transient failures are retried after the delays
/// of `backoff`. Only for idempotent calls.
pub(super) async fn with_retries<T, F, Fut>(
    rpc: &'static str,
    mut backoff: Backoff,
    mut attempt: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(status) if transient(&status) && tries < REPORT_TRIES => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    rpc,
                    code = ?status.code(),
                    message = status.message(),
                    tries,
                    retry_in = ?delay,
                    "call failed; retrying"
                );
                tokio::time::sleep(delay).await;
                tries += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(1), Duration::from_millis(1))
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn transient_failures_are_retried_a_bounded_number_of_times() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = with_retries("Test", quick(), || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("down")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), REPORT_TRIES);
    }

    #[tokio::test]
    async fn a_transient_failure_then_success_succeeds() {
        let calls = AtomicU32::new(0);
        let result = with_retries("Test", quick(), || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(Status::unavailable("down"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 1);
    }

    #[tokio::test]
    async fn other_failures_are_not_retried() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = with_retries("Test", quick(), || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::failed_precondition("aborted")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
