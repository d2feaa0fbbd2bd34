//! `actionsd.read.v1.ReadService`: what the store holds, read-only.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{field, info_span, Instrument, Span};

use super::convert::{self, decode_stored, timestamp_to_proto};
use super::watch;
use crate::auth;
use crate::domain::{
    ActionFilter, ActionKind, ActionPosition, ActionRecord, ActionState, Error, HistoryEntry,
    PageRequest, Phase, RunFilter, RunPosition, RunRecord,
};
use crate::pipeline::Registry;
use crate::proto::actionsd::read::v1::{
    self as read, read_service_server::ReadService, watch_run_response,
};
use crate::proto::flyteidl2::actions;
use crate::store::Store;

/// Page size when a request names none, and the largest one allowed.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

pub type WatchRunStream = watch::MessageStream<read::WatchRunResponse>;

#[derive(Clone)]
pub struct ReadApi {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
}

impl ReadApi {
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>) -> Self {
        Self { store, registry }
    }
}

fn limit(value: u32) -> Result<usize, Error> {
    match usize::try_from(value).unwrap_or(usize::MAX) {
        0 => Ok(DEFAULT_LIMIT),
        n if n <= MAX_LIMIT => Ok(n),
        n => Err(Error::invalid(
            "limit",
            format!("is {n}; the largest page is {MAX_LIMIT}"),
        )),
    }
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn list_actions_request(
    request: &read::ListActionsRequest,
) -> Result<(ActionFilter, PageRequest<ActionPosition>), Error> {
    let run = request
        .run
        .as_ref()
        .map(|run| convert::run_id("run", Some(run)))
        .transpose()?;
    let parent = optional(&request.parent_name);
    if parent.is_some() && run.is_none() {
        return Err(Error::invalid("parent_name", "needs run"));
    }
    let phases = request
        .phases
        .iter()
        .enumerate()
        .map(|(i, phase)| {
            Phase::from_wire(*phase)
                .ok_or_else(|| Error::invalid(format!("phases[{i}]"), "is not a known phase"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let after = optional(&request.page_token)
        .map(|token| ActionPosition::from_token(&token))
        .transpose()?;
    Ok((
        ActionFilter {
            run,
            parent,
            phases,
            queue: optional(&request.queue),
        },
        PageRequest {
            limit: limit(request.limit)?,
            after,
        },
    ))
}

fn kind_to_proto(kind: ActionKind) -> read::ActionKind {
    match kind {
        ActionKind::Task => read::ActionKind::Task,
        ActionKind::Trace => read::ActionKind::Trace,
        ActionKind::Condition => read::ActionKind::Condition,
    }
}

/// The fields every state carries, snapshot or live.
fn summary_of_state(state: &ActionState) -> read::ActionSummary {
    read::ActionSummary {
        id: Some(convert::action_id_to_proto(&state.id)),
        parent_name: state.parent.clone().unwrap_or_default(),
        phase: state.phase.to_wire(),
        attempt: state.attempt,
        version: u64::try_from(state.version).unwrap_or(0),
        queue: state.queue.clone().unwrap_or_default(),
        lease_holder: state.lease_holder.clone().unwrap_or_default(),
        output_uri: state.output_uri.clone(),
        error: state
            .error
            .as_ref()
            .and_then(|b| decode_stored("error", &state.id, b)),
        signal_value: state
            .value
            .as_ref()
            .and_then(|b| decode_stored("value", &state.id, b)),
        ..Default::default()
    }
}

fn summary(record: &ActionRecord) -> read::ActionSummary {
    read::ActionSummary {
        kind: kind_to_proto(record.kind).into(),
        lease_deadline: record.lease_deadline.map(timestamp_to_proto),
        abort_reason: record.abort_reason.clone().unwrap_or_default(),
        aborted_by: record
            .aborted_by
            .as_ref()
            .and_then(|b| decode_stored("aborted_by", &record.state.id, b)),
        signalled_by: record
            .signalled_by
            .as_ref()
            .and_then(|b| decode_stored("signalled_by", &record.state.id, b)),
        created_at: Some(timestamp_to_proto(record.created_at)),
        updated_at: Some(timestamp_to_proto(record.updated_at)),
        start_time: record.start_time.map(timestamp_to_proto),
        end_time: record.end_time.map(timestamp_to_proto),
        deadline: record.deadline.map(timestamp_to_proto),
        ..summary_of_state(&record.state)
    }
}

fn run_summary(run: &RunRecord) -> read::RunSummary {
    read::RunSummary {
        id: Some(convert::run_id_to_proto(&run.id)),
        root_name: run.root_name.clone(),
        phase: run.phase.to_wire(),
        counts: run
            .counts
            .iter()
            .map(|(phase, count)| read::PhaseCount {
                phase: phase.to_wire(),
                count: *count,
            })
            .collect(),
        actions: run.counts.iter().map(|(_, count)| count).sum(),
        queue: run.queue.clone().unwrap_or_default(),
        created_at: Some(timestamp_to_proto(run.created_at)),
    }
}

fn history_event(entry: &HistoryEntry) -> read::ActionEvent {
    let summary = summary_of_state(&entry.state);
    read::ActionEvent {
        version: summary.version,
        phase: summary.phase,
        attempt: summary.attempt,
        output_uri: summary.output_uri,
        error: summary.error,
        signal_value: summary.signal_value,
        lease_holder: summary.lease_holder,
        time: Some(timestamp_to_proto(entry.at)),
        changed_by: entry.by.clone().unwrap_or_default(),
    }
}

fn run_update(action: read::ActionSummary) -> read::WatchRunResponse {
    read::WatchRunResponse {
        message: Some(watch_run_response::Message::Action(action)),
    }
}

fn span(method: &'static str) -> Span {
    info_span!("rpc", method, action = field::Empty)
}

#[tonic::async_trait]
impl ReadService for ReadApi {
    type WatchRunStream = WatchRunStream;

    async fn get_action(
        &self,
        request: Request<read::GetActionRequest>,
    ) -> Result<Response<read::GetActionResponse>, Status> {
        async {
            let id = convert::action_id("id", request.get_ref().id.as_ref())?;
            Span::current().record("action", field::display(&id));
            auth::authorize(request.extensions(), &auth::Target::action(&id))?;
            let record = self.store.get_action(&id).await?;
            let spec = decode_stored::<actions::Action>("spec", &id, &record.spec);
            Ok(Response::new(read::GetActionResponse {
                action: Some(summary(&record)),
                spec,
            }))
        }
        .instrument(span("GetAction"))
        .await
    }

    async fn list_actions(
        &self,
        request: Request<read::ListActionsRequest>,
    ) -> Result<Response<read::ListActionsResponse>, Status> {
        async {
            let (filter, page) = list_actions_request(request.get_ref())?;
            let target = filter
                .run
                .as_ref()
                .map(auth::Target::run)
                .unwrap_or_default();
            auth::authorize(request.extensions(), &target)?;
            let page = self.store.list_actions(&filter, &page).await?;
            Ok(Response::new(read::ListActionsResponse {
                actions: page.items.iter().map(summary).collect(),
                next_page_token: page.next.map(|p| p.to_token()).unwrap_or_default(),
            }))
        }
        .instrument(span("ListActions"))
        .await
    }

    async fn list_runs(
        &self,
        request: Request<read::ListRunsRequest>,
    ) -> Result<Response<read::ListRunsResponse>, Status> {
        async {
            auth::authorize(
                request.extensions(),
                &auth::Target::project(&request.get_ref().project, &request.get_ref().domain),
            )?;
            let request = request.get_ref();
            let filter = RunFilter {
                org: optional(&request.org),
                project: optional(&request.project),
                domain: optional(&request.domain),
            };
            let page = PageRequest {
                limit: limit(request.limit)?,
                after: optional(&request.page_token)
                    .map(|token| RunPosition::from_token(&token))
                    .transpose()?,
            };
            let page = self.store.list_runs(&filter, &page).await?;
            Ok(Response::new(read::ListRunsResponse {
                runs: page.items.iter().map(run_summary).collect(),
                next_page_token: page.next.map(|p| p.to_token()).unwrap_or_default(),
            }))
        }
        .instrument(span("ListRuns"))
        .await
    }

    async fn delete_run(
        &self,
        request: Request<read::DeleteRunRequest>,
    ) -> Result<Response<read::DeleteRunResponse>, Status> {
        async {
            let run = convert::run_id("run_id", request.get_ref().run_id.as_ref())?;
            let result = self.store.delete_run(&run).await.map_err(Status::from);
            auth::audit(request.extensions(), "DeleteRun", &run, &result);
            let deleted = result?;
            crate::retention::record(deleted);
            tracing::info!(run = %run, actions = deleted.actions, "run deleted by request");
            Ok(Response::new(read::DeleteRunResponse {
                actions: deleted.actions,
                events: deleted.events,
            }))
        }
        .instrument(span("DeleteRun"))
        .await
    }

    async fn get_history(
        &self,
        request: Request<read::GetHistoryRequest>,
    ) -> Result<Response<read::GetHistoryResponse>, Status> {
        async {
            let id = convert::action_id("id", request.get_ref().id.as_ref())?;
            Span::current().record("action", field::display(&id));
            auth::authorize(request.extensions(), &auth::Target::action(&id))?;
            let history = self.store.history(&id).await?;
            Ok(Response::new(read::GetHistoryResponse {
                events: history.iter().map(history_event).collect(),
            }))
        }
        .instrument(span("GetHistory"))
        .await
    }

    async fn watch_run(
        &self,
        request: Request<read::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        async {
            let run = convert::run_id("run", request.get_ref().run.as_ref())?;
            Span::current().record("action", field::display(&run));
            auth::authorize(request.extensions(), &auth::Target::run(&run))?;
            // Subscribe first: see `watch::snapshot_then_live`.
            let subscription = self.registry.subscribe_run(run.clone());
            let filter = ActionFilter {
                run: Some(run.clone()),
                ..ActionFilter::default()
            };
            let first = self
                .store
                .list_actions(
                    &filter,
                    &PageRequest {
                        limit: watch::SNAPSHOT_PAGE,
                        after: None,
                    },
                )
                .await?;
            if first.items.is_empty() {
                return Err(Error::RunNotFound(run).into());
            }
            let store = self.store.clone();
            Ok(Response::new(watch::snapshot_then_live(
                first,
                move |after| {
                    let store = store.clone();
                    let filter = filter.clone();
                    async move {
                        store
                            .list_actions(
                                &filter,
                                &PageRequest {
                                    limit: watch::SNAPSHOT_PAGE,
                                    after: Some(after),
                                },
                            )
                            .await
                    }
                },
                |record| &record.state,
                |record| run_update(summary(&record)),
                read::WatchRunResponse {
                    message: Some(watch_run_response::Message::Sentinel(true)),
                },
                subscription,
                |event| run_update(summary_of_state(event)),
            )))
        }
        .instrument(span("WatchRun"))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_are_bounded() {
        assert_eq!(limit(0).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(7).unwrap(), 7);
        let err = limit(1001).unwrap_err();
        assert!(err.to_string().starts_with("limit:"), "{err}");
    }

    #[test]
    fn listing_filters_are_validated() {
        let parent_only = read::ListActionsRequest {
            parent_name: "a0".into(),
            ..Default::default()
        };
        let err = list_actions_request(&parent_only).unwrap_err();
        assert!(err.to_string().starts_with("parent_name:"), "{err}");
        let bad_phase = read::ListActionsRequest {
            phases: vec![4, 99],
            ..Default::default()
        };
        let err = list_actions_request(&bad_phase).unwrap_err();
        assert!(err.to_string().starts_with("phases[1]:"), "{err}");
        let bad_token = read::ListActionsRequest {
            page_token: "nope".into(),
            ..Default::default()
        };
        let err = list_actions_request(&bad_token).unwrap_err();
        assert!(err.to_string().starts_with("page_token:"), "{err}");
    }
}
