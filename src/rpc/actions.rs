//! `flyteidl2.actions.ActionsService`.

use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{field, info_span, Instrument, Span};

use super::{convert, watch};
use crate::auth;
use crate::domain::{ActionId, ActionKind, Command, Error, Phase};
use crate::pipeline::{Registry, Waker};
use crate::proto::flyteidl2::actions::{
    self, actions_service_server::ActionsService, watch_for_updates_response,
};
use crate::proto::flyteidl2::workflow::ControlMessage;
use crate::store::Store;

/// Request headers the Flyte SDK sends; recorded on the RPC span.
const REQUEST_ID: &str = "x-request-id";
const SDK_RUN: &str = "x-actions-run";

pub type WatchStream = watch::MessageStream<actions::WatchForUpdatesResponse>;

/// The service's state: the store, the pipeline's registry and waker, and
/// a tracker of in-flight writes that shutdown waits for.
#[derive(Clone)]
pub struct ActionsApi {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    waker: Waker,
    writes: TaskTracker,
}

impl ActionsApi {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        waker: Waker,
        writes: TaskTracker,
    ) -> Self {
        Self {
            store,
            registry,
            waker,
            writes,
        }
    }

    /// Runs one write to commit, then wakes the event feeds. With
    /// authentication on, the caller's scope is applied to the action (and,
    /// for Update, its queue), the caller recorded as who aborted or
    /// signalled (a client-supplied identity is replaced), and the write
    /// audited.
    async fn write(
        &self,
        extensions: &http::Extensions,
        method: &'static str,
        command: Result<Command, Error>,
    ) -> Result<(), Status> {
        let _in_flight = self.writes.token();
        let mut command = command?;
        let id = command.action_id().clone();
        Span::current().record("action", field::display(&id));
        let result = async {
            let queue = match (&command, auth::principal(extensions)) {
                (Command::Update(_), Some(_)) => self.store.get_action(&id).await?.state.queue,
                _ => None,
            };
            auth::authorize(
                extensions,
                &auth::Target::action(&id).with_queue(queue.as_deref()),
            )?;
            if let Some(principal) = auth::principal(extensions) {
                command.set_by(principal.name.clone());
            }
            if let Some(who) = auth::recorded_identity(extensions) {
                match &mut command {
                    Command::Abort(abort) => abort.aborted_by = Some(who),
                    Command::Signal(signal) => signal.signalled_by = Some(who),
                    _ => {}
                }
            }
            // A new queued task action: wake this daemon's lease streams.
            let queued = match &command {
                Command::Enqueue(enqueue)
                    if enqueue.kind == ActionKind::Task && enqueue.phase == Phase::Queued =>
                {
                    Some(enqueue.task_queue.clone())
                }
                _ => None,
            };
            let events = self.store.execute(command).await?;
            if events > 0 {
                self.waker.wake();
                if let Some(queue) = queued {
                    self.waker.queued(queue.as_deref());
                }
            }
            tracing::debug!(events, "accepted");
            Ok(())
        }
        .await;
        auth::audit(extensions, method, &id, &result);
        result
    }

    async fn watch(&self, parent: ActionId) -> Result<WatchStream, Error> {
        // Subscribe before reading the snapshot: a change committed after
        // the snapshot was read reaches the subscription.
        let subscription = self.registry.subscribe(parent.clone());
        let first = self
            .store
            .watch_snapshot(&parent, None, watch::SNAPSHOT_PAGE)
            .await?;
        let store = self.store.clone();
        Ok(watch::snapshot_then_live(
            first,
            move |after| {
                let store = store.clone();
                let parent = parent.clone();
                async move {
                    store
                        .watch_snapshot(&parent, Some(&after), watch::SNAPSHOT_PAGE)
                        .await
                }
            },
            |state| state,
            |state| update_message(&state),
            actions::WatchForUpdatesResponse {
                message: Some(watch_for_updates_response::Message::ControlMessage(
                    ControlMessage { sentinel: true },
                )),
            },
            subscription,
            update_message,
        ))
    }
}

fn update_message(state: &crate::domain::ActionState) -> actions::WatchForUpdatesResponse {
    actions::WatchForUpdatesResponse {
        message: Some(watch_for_updates_response::Message::ActionUpdate(
            convert::action_update(state),
        )),
    }
}

fn header<'a>(metadata: &'a MetadataMap, name: &str) -> &'a str {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn rpc_span(method: &'static str, metadata: &MetadataMap) -> Span {
    info_span!(
        "rpc",
        method,
        action = field::Empty,
        request_id = header(metadata, REQUEST_ID),
        sdk_run = header(metadata, SDK_RUN),
    )
}

#[tonic::async_trait]
impl ActionsService for ActionsApi {
    type WatchForUpdatesStream = WatchStream;

    async fn enqueue(
        &self,
        request: Request<actions::EnqueueRequest>,
    ) -> Result<Response<actions::EnqueueResponse>, Status> {
        let span = rpc_span("Enqueue", request.metadata());
        let extensions = request.extensions().clone();
        let command = convert::enqueue(request.into_inner()).map(Command::Enqueue);
        self.write(&extensions, "Enqueue", command)
            .instrument(span)
            .await?;
        Ok(Response::new(actions::EnqueueResponse {}))
    }

    async fn watch_for_updates(
        &self,
        request: Request<actions::WatchForUpdatesRequest>,
    ) -> Result<Response<Self::WatchForUpdatesStream>, Status> {
        let span = rpc_span("WatchForUpdates", request.metadata());
        async {
            let parent = convert::watch_parent(request.get_ref())?;
            Span::current().record("action", field::display(&parent));
            auth::authorize(request.extensions(), &auth::Target::action(&parent))?;
            let stream = self.watch(parent).await?;
            tracing::debug!("watch started");
            Ok(Response::new(stream))
        }
        .instrument(span)
        .await
    }

    async fn update(
        &self,
        request: Request<actions::UpdateRequest>,
    ) -> Result<Response<actions::UpdateResponse>, Status> {
        let span = rpc_span("Update", request.metadata());
        let extensions = request.extensions().clone();
        let command = convert::update(request.into_inner()).map(Command::Update);
        self.write(&extensions, "Update", command)
            .instrument(span)
            .await?;
        Ok(Response::new(actions::UpdateResponse {}))
    }

    async fn abort(
        &self,
        request: Request<actions::AbortRequest>,
    ) -> Result<Response<actions::AbortResponse>, Status> {
        let span = rpc_span("Abort", request.metadata());
        let extensions = request.extensions().clone();
        let command = convert::abort(request.into_inner()).map(Command::Abort);
        self.write(&extensions, "Abort", command)
            .instrument(span)
            .await?;
        Ok(Response::new(actions::AbortResponse {}))
    }

    async fn signal(
        &self,
        request: Request<actions::SignalRequest>,
    ) -> Result<Response<actions::SignalResponse>, Status> {
        let span = rpc_span("Signal", request.metadata());
        let extensions = request.extensions().clone();
        let command = convert::signal(request.into_inner()).map(Command::Signal);
        self.write(&extensions, "Signal", command)
            .instrument(span)
            .await?;
        Ok(Response::new(actions::SignalResponse {}))
    }
}
