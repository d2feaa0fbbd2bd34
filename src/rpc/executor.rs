//! `actionsd.executor.v1.ExecutorService`: leasing for executors.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{field, info_span, Instrument, Span};

use super::convert::{self, action_id_to_proto};
use crate::domain::{ActionState, Command, Error, Lease};
use crate::logs::LogStore;
use crate::pipeline::{ExecutorRegistry, Waker};
use crate::proto::actionsd::executor::v1::{
    self as pb, executor_service_server::ExecutorService, lease_response,
};
use crate::proto::flyteidl2::core::ExecutionError;
use crate::store::Store;

/// How long a lease stream waits for a wake-up before it looks again. Work
/// arrives through wake-ups from the event feed; this only covers an
/// action left unclaimed by a claimer whose transaction failed.
const SAFETY_RECHECK: Duration = Duration::from_secs(30);

pub type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseResponse, Status>> + Send>>;

#[derive(Clone)]
pub struct ExecutorApi {
    store: Arc<dyn Store>,
    executors: Arc<ExecutorRegistry>,
    waker: Waker,
    writes: TaskTracker,
    lease_ttl: Duration,
    /// Where AppendLogs writes; without it AppendLogs is UNIMPLEMENTED.
    logs: Option<LogStore>,
    /// Lease streams end with UNAVAILABLE when it fires.
    shutdown: CancellationToken,
    /// Mints each lease's task credential (authentication on).
    task_credentials: Option<Arc<crate::auth::tokens::Issuer>>,
}

impl ExecutorApi {
    pub fn new(
        store: Arc<dyn Store>,
        executors: Arc<ExecutorRegistry>,
        waker: Waker,
        writes: TaskTracker,
        lease_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            executors,
            waker,
            writes,
            lease_ttl,
            logs: None,
            shutdown,
            task_credentials: None,
        }
    }

    /// Gives every lease a run-scoped task credential signed by `issuer`.
    pub fn with_task_credentials(mut self, issuer: Arc<crate::auth::tokens::Issuer>) -> Self {
        self.task_credentials = Some(issuer);
        self
    }

    /// Accepts attempt logs into `logs`.
    pub fn with_logs(mut self, logs: LogStore) -> Self {
        self.logs = Some(logs);
        self
    }
}

fn leased(lease: Lease, issuer: Option<&crate::auth::tokens::Issuer>) -> pb::LeaseResponse {
    let task_credential = issuer.map(|issuer| pb::TaskCredential {
        client_id: crate::auth::tokens::TASK_CLIENT_ID.to_owned(),
        client_secret: issuer.task_key(&lease.id, lease.attempt),
    });
    pb::LeaseResponse {
        event: Some(lease_response::Event::Leased(pb::LeasedAction {
            action_id: Some(action_id_to_proto(&lease.id)),
            action: lease.spec,
            run_spec: lease.run_spec,
            attempt: lease.attempt,
            lease_deadline: Some(convert::timestamp_to_proto(lease.deadline)),
            output_uri: lease.output_uri,
            task_credential,
        })),
    }
}

fn cancellation(id: &crate::domain::ActionId, attempt: u32, reason: String) -> pb::Cancellation {
    pb::Cancellation {
        action_id: Some(action_id_to_proto(id)),
        attempt,
        reason,
    }
}

/// The reason an aborted action carries in its event's error.
fn abort_reason(event: &ActionState) -> String {
    cancellation_reason(
        event
            .error
            .as_ref()
            .and_then(|bytes| ExecutionError::decode(bytes.clone()).ok())
            .map(|e| e.message)
            .unwrap_or_default(),
    )
}

/// The reason a cancellation carries, the same whether it arrives on the
/// lease stream or in a heartbeat: the Abort's reason, or "aborted" when
/// it gave none (as in the action's ExecutionError).
pub fn cancellation_reason(reason: String) -> String {
    if reason.is_empty() {
        crate::rpc::convert::DEFAULT_ABORT_REASON.to_owned()
    } else {
        reason
    }
}

#[tonic::async_trait]
impl ExecutorService for ExecutorApi {
    type LeaseStream = LeaseStream;

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let request_extensions = request.extensions().clone();
        let mut request = convert::lease_request(request.into_inner(), self.lease_ttl)?;
        request.executor = crate::auth::lease_holder(&request_extensions, &request.executor);
        crate::auth::authorize(
            &request_extensions,
            &crate::auth::Target::queue(&request.queue),
        )?;
        if let Some(authorized) = request_extensions.get::<crate::auth::Authorized>() {
            if request.capacity > authorized.max_lease_capacity {
                ::metrics::counter!(crate::metrics::names::LIMITED, "limit" => "lease_capacity")
                    .increment(1);
                tracing::warn!(
                    principal = %authorized.principal.name,
                    capacity = request.capacity,
                    "lease capacity over the limit"
                );
                return Err(Status::resource_exhausted(format!(
                    "capacity {} is over the limit of {} per lease stream (auth.limits.max_lease_capacity)",
                    request.capacity, authorized.max_lease_capacity
                )));
            }
        }
        let issuer = self.task_credentials.clone();
        let span = info_span!(
            "lease",
            executor = %request.executor,
            queue = %request.queue,
            capacity = request.capacity
        );
        // Register before the first claim, so no wake-up is missed.
        let waiter = self.executors.register(&request.queue, &request.executor);
        let store = self.store.clone();
        let waker = self.waker.clone();
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            // Leases this executor holds but may never have received (a
            // stream that broke mid-send) come first; executors ignore an
            // attempt they already run.
            match store.leases_of(&request.executor).instrument(span.clone()).await {
                Ok(held) => {
                    for lease in held {
                        yield Ok(leased(lease, issuer.as_deref()));
                    }
                }
                Err(err) => {
                    yield Err(Status::from(err));
                    return;
                }
            }
            loop {
                match store.claim(&request).instrument(span.clone()).await {
                    Ok(leases) => {
                        if !leases.is_empty() {
                            waker.wake();
                        }
                        for lease in leases {
                            span.in_scope(|| {
                                tracing::debug!(action = %lease.id, attempt = lease.attempt, "leased");
                            });
                            yield Ok(leased(lease, issuer.as_deref()));
                        }
                    }
                    Err(err) => {
                        yield Err(Status::from(err));
                        break;
                    }
                }
                for event in waiter.take_cancelled() {
                    yield Ok(pb::LeaseResponse {
                        event: Some(lease_response::Event::Cancelled(cancellation(
                            &event.id,
                            event.attempt,
                            abort_reason(&event),
                        ))),
                    });
                }
                tokio::select! {
                    () = waiter.woken() => {}
                    () = tokio::time::sleep(SAFETY_RECHECK) => {}
                    // Like watch streams: the executor reconnects (to
                    // another daemon, or to this one once it is back) and
                    // is sent the leases it holds again.
                    () = shutdown.cancelled() => {
                        yield Err(Status::unavailable("actionsd is shutting down"));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let holder =
            crate::auth::lease_holder(request.extensions(), &request.get_ref().executor_id);
        let request = request.into_inner();
        if request.executor_id.is_empty() {
            return Err(Error::invalid("executor_id", "must not be empty").into());
        }
        let outcome = self
            .store
            .heartbeat(&holder, self.lease_ttl)
            .instrument(info_span!("heartbeat", executor = %holder))
            .await?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_deadline: Some(convert::timestamp_to_proto(outcome.deadline)),
            cancelled: outcome
                .cancelled
                .into_iter()
                .map(|c| cancellation(&c.id, c.attempt, cancellation_reason(c.reason)))
                .collect(),
        }))
    }

    async fn finish(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let span = info_span!("rpc", method = "Finish", action = field::Empty);
        async {
            let _in_flight = self.writes.token();
            let extensions = request.extensions().clone();
            let mut finish = convert::finish(request.into_inner())?;
            finish.by = crate::auth::principal(&extensions).map(|p| p.name.clone());
            finish.executor = crate::auth::lease_holder(&extensions, &finish.executor);
            Span::current().record("action", field::display(&finish.id));
            let id = finish.id.clone();
            let result = async {
                self.authorize_queue(&extensions, &finish.id).await?;
                let events = self.store.execute(Command::Finish(finish)).await?;
                if events > 0 {
                    self.waker.wake();
                }
                Ok(Response::new(pb::FinishResponse {}))
            }
            .await;
            crate::auth::audit(&extensions, "Finish", &id, &result);
            result
        }
        .instrument(span)
        .await
    }

    async fn append_logs(
        &self,
        request: Request<pb::AppendLogsRequest>,
    ) -> Result<Response<pb::AppendLogsResponse>, Status> {
        let span = info_span!("rpc", method = "AppendLogs", action = field::Empty);
        async {
            let Some(logs) = &self.logs else {
                return Err(Status::unimplemented("this daemon keeps no logs"));
            };
            let extensions = request.extensions().clone();
            let request = request.into_inner();
            if request.executor_id.is_empty() {
                return Err(Error::invalid("executor_id", "must not be empty").into());
            }
            if request.attempt == 0 {
                return Err(Error::invalid("attempt", "must be greater than 0").into());
            }
            let id = convert::action_id("action_id", request.action_id.as_ref())?;
            Span::current().record("action", field::display(&id));
            // Only the executor that holds (or last held) this attempt's
            // lease writes its log.
            let state = self.store.get_action(&id).await?.state;
            crate::auth::authorize(
                &extensions,
                &crate::auth::Target::action(&id).with_queue(state.queue.as_deref()),
            )?;
            if state.attempt != request.attempt
                || state.lease_holder.as_deref()
                    != Some(crate::auth::lease_holder(&extensions, &request.executor_id).as_str())
            {
                return Err(Error::FailedPrecondition(format!(
                    "attempt {} of {id} is not leased to {}",
                    request.attempt, request.executor_id
                ))
                .into());
            }
            let stored = logs
                .append(&id, request.attempt, request.sequence, request.lines)
                .await?;
            Ok(Response::new(pb::AppendLogsResponse { truncated: !stored }))
        }
        .instrument(span)
        .await
    }
}

impl ExecutorApi {
    /// The scope check of a method that names an action: its queue must be
    /// one of the caller's (looked up only when authentication is on).
    async fn authorize_queue(
        &self,
        extensions: &http::Extensions,
        id: &crate::domain::ActionId,
    ) -> Result<(), Status> {
        if crate::auth::principal(extensions).is_none() {
            return Ok(());
        }
        let state = self.store.get_action(id).await?.state;
        crate::auth::authorize(
            extensions,
            &crate::auth::Target::action(id).with_queue(state.queue.as_deref()),
        )
    }
}
