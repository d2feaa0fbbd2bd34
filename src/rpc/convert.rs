//! Conversion between flyteidl2 messages and domain types, with the
//! validation rules of the wire contract. Error messages name the field.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use prost::Message;

use crate::domain::limits::{self, check_id_part, check_text};
use crate::domain::{
    initial_phase, AbortAction, ActionId, ActionKind, ActionState, ClaimRequest, EnqueueAction,
    Error, FinishAction, Phase, RunId, RunSettings, SignalAction, SignalValue, SimpleKind,
    UpdateStatus,
};
use crate::proto::actionsd::executor::v1 as executor;
use crate::proto::flyteidl2::{actions, common, core, workflow};

use limits::{MAX_ACTION_NAME, MAX_DOMAIN, MAX_ORG, MAX_PROJECT, MAX_RUN_NAME, MAX_URI};

/// The typed view actionsd reads from the opaque RunSpec bytes.
#[derive(Clone, PartialEq, Message)]
struct RunSpecView {
    #[prost(string, tag = "6")]
    queue: String,
    #[prost(uint32, tag = "13")]
    max_action_concurrency: u32,
}

fn check_len(field: &str, value: &str, max: usize, required: bool) -> Result<(), Error> {
    if required && value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

/// Validates an action identifier; `field` is its path in the request.
pub fn action_id(field: &str, id: Option<&common::ActionIdentifier>) -> Result<ActionId, Error> {
    let id = id.ok_or_else(|| Error::invalid(field, "is required"))?;
    let run = run_id(&format!("{field}.run"), id.run.as_ref())?;
    check_id_part(&format!("{field}.name"), &id.name, MAX_ACTION_NAME, true)?;
    Ok(ActionId::new(run, id.name.clone()))
}

/// Validates a run identifier; `field` is its path in the request.
pub fn run_id(field: &str, run: Option<&common::RunIdentifier>) -> Result<RunId, Error> {
    let run = run.ok_or_else(|| Error::invalid(field, "is required"))?;
    check_id_part(&format!("{field}.org"), &run.org, MAX_ORG, false)?;
    check_id_part(&format!("{field}.project"), &run.project, MAX_PROJECT, true)?;
    check_id_part(&format!("{field}.domain"), &run.domain, MAX_DOMAIN, true)?;
    check_id_part(&format!("{field}.name"), &run.name, MAX_RUN_NAME, true)?;
    // The alias the Flyte executor hands its task processes for the
    // empty org (see `EMPTY_ORG_ALIAS`).
    let org = if run.org == crate::domain::EMPTY_ORG_ALIAS {
        String::new()
    } else {
        run.org.clone()
    };
    Ok(RunId {
        org,
        project: run.project.clone(),
        domain: run.domain.clone(),
        name: run.name.clone(),
    })
}

pub fn run_id_to_proto(run: &RunId) -> common::RunIdentifier {
    common::RunIdentifier {
        org: run.org.clone(),
        project: run.project.clone(),
        domain: run.domain.clone(),
        name: run.name.clone(),
    }
}

pub fn action_id_to_proto(id: &ActionId) -> common::ActionIdentifier {
    common::ActionIdentifier {
        run: Some(run_id_to_proto(&id.run)),
        name: id.name.clone(),
    }
}

fn timestamp(
    field: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, Error> {
    ts.map(|ts| limits::check_time(field, ts.seconds, ts.nanos))
        .transpose()
}

/// Validates an Enqueue. The stored spec is the `Action` re-encoded with
/// deterministic field order; opaque spec payloads are bytes and pass
/// through unchanged.
pub fn enqueue(request: actions::EnqueueRequest) -> Result<EnqueueAction, Error> {
    let mut action = request
        .action
        .ok_or_else(|| Error::invalid("action", "is required"))?;
    // An empty parent name means "root", as an absent one does; normalise
    // it so that both encode the same for the idempotency comparison.
    if action.parent_action_name.as_deref() == Some("") {
        action.parent_action_name = None;
    }
    let id = action_id("action.action_id", action.action_id.as_ref())?;
    if action.recovered_from.is_some() {
        return Err(Error::invalid(
            "action.recovered_from",
            "is set by the server only",
        ));
    }
    check_len("action.input_uri", &action.input_uri, MAX_URI, true)?;
    check_len(
        "action.run_output_base",
        &action.run_output_base,
        MAX_URI,
        true,
    )?;
    let parent = match action.parent_action_name.as_deref() {
        None => None,
        Some(name) => {
            check_id_part("action.parent_action_name", name, MAX_ACTION_NAME, true)?;
            if name == id.name {
                return Err(Error::invalid(
                    "action.parent_action_name",
                    "an action cannot be its own parent",
                ));
            }
            Some(name.to_owned())
        }
    };

    let mut task_queue = None;
    let mut output_uri = String::new();
    let mut condition_type = None;
    let mut condition_timeout = None;
    let (kind, phase) = match action.spec.as_ref() {
        None => {
            return Err(Error::invalid(
                "action.spec",
                "exactly one of task, trace or condition is required",
            ))
        }
        Some(actions::action::Spec::Task(task)) => {
            check_len("action.task.queue", &task.queue, limits::MAX_QUEUE, false)?;
            if !task.queue.is_empty() {
                task_queue = Some(task.queue.clone());
            }
            (ActionKind::Task, initial_phase(ActionKind::Task, None))
        }
        Some(actions::action::Spec::Trace(trace)) => {
            let reported = match trace.phase {
                0 => None,
                value => Some(Phase::from_wire(value).ok_or_else(|| {
                    Error::invalid("action.trace.phase", format!("unknown phase {value}"))
                })?),
            };
            let phase = initial_phase(ActionKind::Trace, reported);
            output_uri = trace
                .outputs
                .as_ref()
                .map(|o| o.output_uri.clone())
                .unwrap_or_default();
            check_len(
                "action.trace.outputs.output_uri",
                &output_uri,
                MAX_URI,
                false,
            )?;
            if let Some(start) = &trace.start_time {
                limits::check_time("action.trace.start_time", start.seconds, start.nanos)?;
            }
            if let Some(end) = &trace.end_time {
                limits::check_time("action.trace.end_time", end.seconds, end.nanos)?;
            }
            (ActionKind::Trace, phase)
        }
        Some(actions::action::Spec::Condition(condition)) => {
            if let Some(core::literal_type::Type::Simple(simple)) =
                condition.r#type.as_ref().and_then(|t| t.r#type.as_ref())
            {
                condition_type = Some(*simple);
            }
            check_text(
                "action.condition.prompt",
                &condition.prompt,
                limits::MAX_PROMPT,
            )?;
            check_text(
                "action.condition.description",
                &condition.description,
                limits::MAX_PROMPT,
            )?;
            if let Some(timeout) = &condition.timeout {
                condition_timeout = Some(limits::check_duration(
                    "action.condition.timeout",
                    timeout.seconds,
                    timeout.nanos,
                )?);
            }
            (
                ActionKind::Condition,
                initial_phase(ActionKind::Condition, None),
            )
        }
    };

    let run = if parent.is_none() {
        let view = RunSpecView::decode(request.run_spec.clone())
            .map_err(|err| Error::invalid("run_spec", format!("is not a valid RunSpec: {err}")))?;
        check_len("run_spec.queue", &view.queue, limits::MAX_QUEUE, false)?;
        Some(RunSettings {
            run_spec: request.run_spec,
            queue: (!view.queue.is_empty()).then_some(view.queue),
            max_action_concurrency: view.max_action_concurrency,
        })
    } else {
        None
    };

    Ok(EnqueueAction {
        by: None,
        id,
        parent,
        kind,
        spec: Bytes::from(action.encode_to_vec()),
        run,
        task_queue,
        phase,
        output_uri,
        run_output_base: action.run_output_base.clone(),
        condition_type,
        condition_timeout,
    })
}

pub fn timestamp_to_proto(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Checks an executor's `ExecutionError`: its texts are bounded.
fn execution_error(field: &str, error: &core::ExecutionError) -> Result<(), Error> {
    check_text(&format!("{field}.code"), &error.code, 256)?;
    check_text(
        &format!("{field}.message"),
        &error.message,
        limits::MAX_ERROR_MESSAGE,
    )?;
    check_len(
        &format!("{field}.error_uri"),
        &error.error_uri,
        MAX_URI,
        false,
    )?;
    check_text(&format!("{field}.worker"), &error.worker, 256)?;
    if let Some(ts) = &error.timestamp {
        limits::check_time(&format!("{field}.timestamp"), ts.seconds, ts.nanos)?;
    }
    Ok(())
}

/// Validates a Lease request.
pub fn lease_request(
    request: executor::LeaseRequest,
    lease_ttl: Duration,
) -> Result<ClaimRequest, Error> {
    check_len("executor_id", &request.executor_id, 256, true)?;
    check_len("queue", &request.queue, limits::MAX_QUEUE, true)?;
    if request.capacity == 0 {
        return Err(Error::invalid("capacity", "must be greater than 0"));
    }
    if request.max_leases != 0 && request.max_leases < request.capacity {
        return Err(Error::invalid(
            "max_leases",
            format!("must be 0 or at least the capacity ({})", request.capacity),
        ));
    }
    Ok(ClaimRequest {
        executor: request.executor_id,
        queue: request.queue,
        capacity: request.capacity,
        max_leases: request.max_leases,
        lease_ttl,
    })
}

/// Validates a Finish.
pub fn finish(request: executor::FinishRequest) -> Result<FinishAction, Error> {
    let id = action_id("action_id", request.action_id.as_ref())?;
    check_len("executor_id", &request.executor_id, 256, true)?;
    if request.attempt == 0 {
        return Err(Error::invalid("attempt", "must be greater than 0"));
    }
    let phase = Phase::from_wire(request.phase)
        .filter(|p| crate::domain::finishable(*p))
        .ok_or_else(|| {
            Error::invalid("phase", "must be SUCCEEDED, FAILED, TIMED_OUT or ABORTED")
        })?;
    check_len("output_uri", &request.output_uri, MAX_URI, false)?;
    if let Some(error) = &request.error {
        execution_error("error", error)?;
    }
    if request.retry && phase != Phase::Failed {
        return Err(Error::invalid("retry", "is only valid with phase FAILED"));
    }
    Ok(FinishAction {
        by: None,
        id,
        executor: request.executor_id,
        attempt: request.attempt,
        phase,
        output_uri: (!request.output_uri.is_empty()).then_some(request.output_uri),
        error: request.error.map(|e| Bytes::from(e.encode_to_vec())),
        retry: request.retry,
    })
}

pub fn update(request: actions::UpdateRequest) -> Result<UpdateStatus, Error> {
    let id = action_id("action_id", request.action_id.as_ref())?;
    if request.attempt == 0 {
        return Err(Error::invalid("attempt", "must be greater than 0"));
    }
    let status = request
        .status
        .ok_or_else(|| Error::invalid("status", "is required"))?;
    let phase = Phase::from_wire(status.phase).ok_or_else(|| {
        Error::invalid(
            "status.phase",
            format!("{} is not a valid phase", status.phase),
        )
    })?;
    let address = request
        .address
        .map(|address| {
            let pod = address.pod.as_ref();
            for (field, value) in [
                ("address.path", address.path.as_str()),
                ("address.url", address.url.as_str()),
                ("address.cluster", address.cluster.as_str()),
                (
                    "address.pod.namespace",
                    pod.map_or("", |p| p.namespace.as_str()),
                ),
                ("address.pod.name", pod.map_or("", |p| p.name.as_str())),
                ("address.pod.ip", pod.map_or("", |p| p.ip.as_str())),
            ] {
                check_len(field, value, MAX_URI, false)?;
            }
            Ok::<_, Error>(Bytes::from(address.encode_to_vec()))
        })
        .transpose()?;
    Ok(UpdateStatus {
        by: None,
        id,
        attempt: request.attempt,
        phase,
        start_time: timestamp("status.start_time", status.start_time.as_ref())?,
        end_time: timestamp("status.end_time", status.end_time.as_ref())?,
        address,
    })
}

/// The reason of an Abort that gave none.
pub const DEFAULT_ABORT_REASON: &str = "aborted";

pub fn abort(request: actions::AbortRequest) -> Result<AbortAction, Error> {
    let id = action_id("action_id", request.action_id.as_ref())?;
    let reason = request.reason.unwrap_or_default();
    check_text("reason", &reason, limits::MAX_ABORT_REASON)?;
    let now = Utc::now();
    let error = core::ExecutionError {
        code: "Aborted".to_owned(),
        message: if reason.is_empty() {
            DEFAULT_ABORT_REASON.to_owned()
        } else {
            reason.clone()
        },
        kind: core::execution_error::ErrorKind::User as i32,
        timestamp: Some(timestamp_to_proto(now)),
        ..Default::default()
    };
    Ok(AbortAction {
        by: None,
        id,
        reason,
        aborted_by: request
            .aborted_by
            .map(|who| Bytes::from(who.encode_to_vec())),
        error: Bytes::from(error.encode_to_vec()),
    })
}

pub fn signal(request: actions::SignalRequest) -> Result<SignalAction, Error> {
    let id = action_id("action_id", request.action_id.as_ref())?;
    check_id_part(
        "parent_action_name",
        &request.parent_action_name,
        MAX_ACTION_NAME,
        true,
    )?;
    let value = request
        .value
        .ok_or_else(|| Error::invalid("value", "is required"))?;
    let primitive = match &value.value {
        Some(core::literal::Value::Scalar(core::Scalar {
            value: Some(core::scalar::Value::Primitive(p)),
        })) => p.value.as_ref(),
        _ => None,
    };
    let encoded = value.encoded_len();
    if encoded > limits::MAX_SIGNAL_VALUE {
        return Err(Error::invalid(
            "value",
            format!(
                "is {encoded} bytes encoded; the limit is {}",
                limits::MAX_SIGNAL_VALUE
            ),
        ));
    }
    let kind = match primitive {
        Some(core::primitive::Value::Boolean(_)) => SimpleKind::Boolean,
        Some(core::primitive::Value::Integer(_)) => SimpleKind::Integer,
        Some(core::primitive::Value::FloatValue(_)) => SimpleKind::Float,
        Some(core::primitive::Value::StringValue(_)) => SimpleKind::String,
        _ => {
            return Err(Error::invalid(
                "value",
                "must be a primitive boolean, integer, float or string literal",
            ))
        }
    };
    Ok(SignalAction {
        by: None,
        id,
        parent: request.parent_action_name,
        value: SignalValue {
            kind,
            literal: Bytes::from(value.encode_to_vec()),
        },
        signalled_by: request
            .signalled_by
            .map(|who| Bytes::from(who.encode_to_vec())),
    })
}

pub fn watch_parent(request: &actions::WatchForUpdatesRequest) -> Result<ActionId, Error> {
    match &request.filter {
        Some(actions::watch_for_updates_request::Filter::ParentActionId(id)) => {
            action_id("parent_action_id", Some(id))
        }
        None => Err(Error::invalid("parent_action_id", "is required")),
    }
}

/// The ActionUpdate a watcher receives for a state.
pub fn action_update(state: &ActionState) -> workflow::ActionUpdate {
    workflow::ActionUpdate {
        action_id: Some(action_id_to_proto(&state.id)),
        phase: state.phase.to_wire(),
        error: state
            .error
            .as_ref()
            .and_then(|b| decode_stored("error", &state.id, b)),
        output_uri: state.output_uri.clone(),
        value: state
            .value
            .as_ref()
            .and_then(|b| decode_stored("value", &state.id, b)),
        address: state
            .address
            .as_ref()
            .and_then(|b| decode_stored("address", &state.id, b)),
    }
}

/// Stored messages were encoded by actionsd itself; a failure here means a
/// damaged row, which is logged and left out rather than failing the stream.
pub fn decode_stored<M: Message + Default>(what: &str, id: &ActionId, bytes: &Bytes) -> Option<M> {
    match M::decode(bytes.clone()) {
        Ok(message) => Some(message),
        Err(err) => {
            tracing::error!(action = %id, field = what, error = %err, "cannot decode stored message");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(project: &str, run: &str, name: &str) -> common::ActionIdentifier {
        common::ActionIdentifier {
            run: Some(common::RunIdentifier {
                org: String::new(),
                project: project.into(),
                domain: "development".into(),
                name: run.into(),
            }),
            name: name.into(),
        }
    }

    #[test]
    fn identifiers_are_checked_field_by_field() {
        let err = action_id("action_id", Some(&id("", "r", "a0"))).unwrap_err();
        assert_eq!(err.to_string(), "action_id.run.project: must not be empty");
        let long = "x".repeat(31);
        let err = action_id("action_id", Some(&id("p", &long, "a0"))).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("action_id.run.name: is 31 bytes long"));
        let err = action_id("action_id", None).unwrap_err();
        assert_eq!(err.to_string(), "action_id: is required");
        assert!(action_id("action_id", Some(&id("p", &"r".repeat(30), "a0"))).is_ok());
    }

    #[test]
    fn run_spec_view_reads_queue_and_concurrency() {
        // Field 6 (queue) = "gpu", field 13 (max_action_concurrency) = 4,
        // plus an unknown field 14 that must be ignored.
        let bytes = [0x32, 3, b'g', b'p', b'u', 0x68, 4, 0x72, 1, b'x'];
        let view = RunSpecView::decode(&bytes[..]).unwrap();
        assert_eq!(view.queue, "gpu");
        assert_eq!(view.max_action_concurrency, 4);
    }
}
