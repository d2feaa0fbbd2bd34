//! Leasing: executors take queued task actions, heartbeat while they run
//! them and report how they finished.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{ActionId, ActionKind, Current, Error, Phase};

/// An executor asking for work.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub executor: String,
    pub queue: String,
    /// How many leased actions of this executor may be unfinished at once,
    /// not counting those waiting on children when `max_leases` > 0.
    pub capacity: u32,
    /// 0: every unfinished lease counts against `capacity`. Otherwise a
    /// lease whose action has unfinished children does not, and at most
    /// `max_leases` leases are unfinished in all.
    pub max_leases: u32,
    pub lease_ttl: Duration,
}

/// A task action leased to an executor. Leasing moved it to INITIALIZING.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: ActionId,
    /// The `Action` as enqueued.
    pub spec: Bytes,
    /// The run's RunSpec as given with the root's Enqueue.
    pub run_spec: Bytes,
    pub attempt: u32,
    pub deadline: DateTime<Utc>,
    /// `<run_output_base>/<action name>/<attempt>`.
    pub output_uri: String,
}

/// A leased action that was aborted: its executor must stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    pub id: ActionId,
    pub attempt: u32,
    pub reason: String,
}

/// What a heartbeat did.
#[derive(Debug, Clone)]
pub struct HeartbeatOutcome {
    /// The new deadline of every live lease of the executor.
    pub deadline: DateTime<Utc>,
    /// Leases of the executor whose action was aborted; reported once.
    pub cancelled: Vec<Cancellation>,
}

/// A validated Finish.
#[derive(Debug, Clone)]
pub struct FinishAction {
    pub id: ActionId,
    pub executor: String,
    pub attempt: u32,
    /// A terminal phase.
    pub phase: Phase,
    /// `None`: `<run_output_base>/<action name>/<attempt>`.
    pub output_uri: Option<String>,
    /// The encoded `ExecutionError`, if any.
    pub error: Option<Bytes>,
    /// With phase FAILED: back to QUEUED as attempt + 1 instead.
    pub retry: bool,
    /// The authenticated principal that asked for the change, recorded
    /// with its event (`None` without authentication).
    pub by: Option<String>,
}

/// How the reaper treats expired leases and overdue conditions.
#[derive(Debug, Clone)]
pub struct ReapSettings {
    /// An expired lease is requeued with attempt + 1 while the attempt is at
    /// most this; after that the action fails.
    pub max_system_retries: u32,
    /// The encoded `ExecutionError` (kind SYSTEM) of an action whose leases
    /// kept expiring.
    pub lease_error: Bytes,
    /// The encoded `ExecutionError` of a condition nobody signalled in time.
    pub timeout_error: Bytes,
}

/// What one reaper pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapOutcome {
    pub requeued: usize,
    pub failed: usize,
    pub timed_out: usize,
}

/// The terminal phases an executor may finish with.
pub fn finishable(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Succeeded | Phase::Failed | Phase::TimedOut | Phase::Aborted
    )
}

/// What happens to an action whose lease expired: it is queued again as
/// the next attempt while `attempt <= max_system_retries`, else it fails
/// (with [`ReapSettings::lease_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseExpiry {
    Requeue,
    Fail,
}

impl LeaseExpiry {
    pub fn decide(attempt: u32, max_system_retries: u32) -> Self {
        if attempt <= max_system_retries {
            Self::Requeue
        } else {
            Self::Fail
        }
    }

    /// The phase the action moves to.
    pub fn phase(self) -> Phase {
        match self {
            Self::Requeue => Phase::Queued,
            Self::Fail => Phase::Failed,
        }
    }
}

/// The phase a condition nobody signalled before its deadline ends in.
pub const CONDITION_TIMEOUT_PHASE: Phase = Phase::TimedOut;

/// Decides a Finish. `Ok(false)`: the attempt already ended the same way
/// (a repeated Finish), nothing changes. The executor must hold the lease
/// of the current attempt; a terminal action (aborted meanwhile, say)
/// cannot end differently.
pub fn decide_finish(
    id: &ActionId,
    current: &Current,
    finish: &FinishAction,
) -> Result<bool, Error> {
    if current.kind != ActionKind::Task {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is not a task action"
        )));
    }
    if finish.attempt != current.attempt {
        return Err(Error::FailedPrecondition(format!(
            "stale attempt {} for action {id}: current attempt is {}",
            finish.attempt, current.attempt
        )));
    }
    if current.lease_holder.as_deref() != Some(finish.executor.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is not leased by executor '{}'",
            finish.executor
        )));
    }
    if current.phase.is_terminal() {
        if current.phase == finish.phase {
            return Ok(false);
        }
        return Err(Error::FailedPrecondition(format!(
            "action {id} is already {}",
            current.phase
        )));
    }
    Ok(true)
}

/// The output location of an attempt of a task action, as every
/// ActionUpdate, lease and Finish reports it: what an executor reported for
/// it, else `<run_output_base>/<action name>/<attempt>`. Traces and
/// conditions keep what they were enqueued or resolved with.
pub fn output_uri(
    kind: ActionKind,
    reported: &str,
    run_output_base: &str,
    action: &str,
    attempt: u32,
) -> String {
    if kind != ActionKind::Task || !reported.is_empty() || run_output_base.is_empty() {
        return reported.to_owned();
    }
    default_output_uri(run_output_base, action, attempt)
}

/// The default output location of an attempt.
fn default_output_uri(run_output_base: &str, action: &str, attempt: u32) -> String {
    format!(
        "{}/{action}/{attempt}",
        run_output_base.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(executor: &str, attempt: u32, phase: Phase) -> FinishAction {
        FinishAction {
            by: None,
            id: id(),
            executor: executor.into(),
            attempt,
            phase,
            output_uri: None,
            error: None,
            retry: false,
        }
    }

    fn id() -> ActionId {
        ActionId::in_test_run("a1")
    }

    #[test]
    fn finish_needs_the_current_attempt_of_the_holder() {
        let leased = |phase| Current {
            kind: ActionKind::Task,
            phase,
            attempt: 2,
            parent: Some("a0".into()),
            condition_type: None,
            value: None,
            lease_holder: Some("e1".into()),
            run_output_base: "s3://b/r".into(),
            address: None,
        };
        let running = leased(Phase::Running);
        assert!(decide_finish(&id(), &running, &finish("e1", 2, Phase::Succeeded)).unwrap());
        assert!(decide_finish(&id(), &running, &finish("e1", 1, Phase::Succeeded)).is_err());
        assert!(decide_finish(&id(), &running, &finish("e2", 2, Phase::Succeeded)).is_err());
        let done = leased(Phase::Succeeded);
        assert!(!decide_finish(&id(), &done, &finish("e1", 2, Phase::Succeeded)).unwrap());
        assert!(decide_finish(
            &id(),
            &leased(Phase::Aborted),
            &finish("e1", 2, Phase::Failed)
        )
        .is_err());
    }

    #[test]
    fn task_output_uris_default_per_attempt_unless_reported() {
        use ActionKind::*;
        assert_eq!(output_uri(Task, "", "s3://b/r", "a1", 3), "s3://b/r/a1/3");
        assert_eq!(output_uri(Task, "s3://x", "s3://b/r", "a1", 3), "s3://x");
        assert_eq!(output_uri(Trace, "", "s3://b/r", "t", 1), "");
        assert_eq!(output_uri(Condition, "", "s3://b/r", "c", 1), "");
        assert_eq!(output_uri(Task, "", "", "a1", 1), "");
    }

    #[test]
    fn default_output_uri_joins_without_double_slashes() {
        assert_eq!(
            default_output_uri("s3://b/run/", "a1", 2),
            "s3://b/run/a1/2"
        );
        assert_eq!(default_output_uri("s3://b/run", "a1", 1), "s3://b/run/a1/1");
    }
}
