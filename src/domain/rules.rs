//! The acceptance rules of Update, Signal and repeated Enqueue.

use bytes::Bytes;

use super::{ActionId, ActionKind, Error, Phase, SignalAction, UpdateStatus};

/// What the rules need to know about an action's current row.
#[derive(Debug, Clone)]
pub struct Current {
    pub kind: ActionKind,
    pub phase: Phase,
    pub attempt: u32,
    pub parent: Option<String>,
    pub condition_type: Option<i32>,
    pub value: Option<Bytes>,
    /// The executor holding (or that last held) a lease.
    pub lease_holder: Option<String>,
    /// Action.run_output_base, for default output locations.
    pub run_output_base: String,
    /// The encoded `ActionAddress` last reported.
    pub address: Option<Bytes>,
}

/// An accepted status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub phase: Phase,
    pub attempt: u32,
}

/// Decides an Update. `Ok(None)` means accepted but nothing changes (no
/// event). Rules:
/// - conditions are resolved by Signal, not by status updates (tasks and
///   traces take them; a trace enqueued in a running phase finishes so);
/// - a lower attempt is stale;
/// - a terminal phase is final, across attempts: repeating it is a no-op,
///   anything else is refused;
/// - a higher attempt starts a new attempt in the phase it reports;
/// - within an attempt phases only move forward (PAUSED ranks with RUNNING);
/// - a new address in an otherwise unchanged update of a live action is a
///   change (the latest address is kept and reaches watchers).
pub fn decide_update(
    id: &ActionId,
    current: &Current,
    update: &UpdateStatus,
) -> Result<Option<Transition>, Error> {
    if current.kind == ActionKind::Condition {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is a condition; conditions are resolved by Signal"
        )));
    }
    if update.attempt < current.attempt {
        return Err(Error::FailedPrecondition(format!(
            "stale attempt {} for action {id}: current attempt is {}",
            update.attempt, current.attempt
        )));
    }
    if current.phase.is_terminal() {
        if update.attempt == current.attempt && update.phase == current.phase {
            return Ok(None);
        }
        return Err(Error::FailedPrecondition(format!(
            "action {id} is already {} (attempt {}); it cannot become {} (attempt {})",
            current.phase, current.attempt, update.phase, update.attempt
        )));
    }
    let next = Transition {
        phase: update.phase,
        attempt: update.attempt,
    };
    if update.attempt > current.attempt {
        return Ok(Some(next));
    }
    if update.phase == current.phase {
        let moved = update
            .address
            .as_ref()
            .is_some_and(|a| current.address.as_ref() != Some(a));
        return Ok(moved.then_some(next));
    }
    if update.phase.rank() < current.phase.rank() {
        return Err(Error::FailedPrecondition(format!(
            "action {id} cannot move back from {} to {} within attempt {}",
            current.phase, update.phase, current.attempt
        )));
    }
    Ok(Some(next))
}

/// Decides a Signal. `Ok(true)`: resolve the condition with the value;
/// `Ok(false)`: the same value was already accepted, nothing changes.
pub fn decide_signal(
    id: &ActionId,
    current: &Current,
    signal: &SignalAction,
) -> Result<bool, Error> {
    if current.kind != ActionKind::Condition {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is a {} action; only condition actions take signals",
            current.kind.name()
        )));
    }
    if current.parent.as_deref() != Some(signal.parent.as_str()) {
        return Err(Error::invalid(
            "parent_action_name",
            format!(
                "'{}' is not the parent of condition {id} (its parent is '{}')",
                signal.parent,
                current.parent.as_deref().unwrap_or("")
            ),
        ));
    }
    let kind = signal.value.kind;
    if current.condition_type != Some(kind as i32) {
        return Err(Error::invalid(
            "value",
            match current.condition_type {
                Some(t) => format!(
                    "a {} value does not match the condition's declared type {}",
                    kind.name(),
                    simple_type_name(t)
                ),
                None => format!("condition {id} declares no simple type that can be signalled"),
            },
        ));
    }
    match current.phase {
        Phase::Paused => Ok(true),
        Phase::Succeeded if current.value.as_ref() == Some(&signal.value.literal) => Ok(false),
        Phase::Succeeded => Err(Error::FailedPrecondition(format!(
            "condition {id} was already signalled with a different value"
        ))),
        phase => Err(Error::FailedPrecondition(format!(
            "condition {id} is {phase} and can no longer be signalled"
        ))),
    }
}

/// Decides a repeated Enqueue of an existing action: the same content is an
/// idempotent success, anything else conflicts.
pub fn decide_enqueue_existing(
    id: &ActionId,
    same_spec: bool,
    same_run_spec: bool,
) -> Result<(), Error> {
    if same_spec && same_run_spec {
        Ok(())
    } else if same_spec {
        Err(Error::AlreadyExists(format!(
            "action {id} already exists with a different run_spec"
        )))
    } else {
        Err(Error::AlreadyExists(format!(
            "action {id} already exists with different content"
        )))
    }
}

/// Decides an Enqueue under `parent`, from the parent's phase (`None`: no
/// such action in the run). Children may only be added to a live parent.
pub fn decide_enqueue_parent(
    id: &ActionId,
    parent: &str,
    parent_phase: Option<Phase>,
) -> Result<(), Error> {
    match parent_phase {
        None => Err(Error::ParentNotFound(id.sibling(parent.to_owned()))),
        Some(phase) if phase.is_terminal() => Err(Error::ParentTerminal {
            parent: id.sibling(parent.to_owned()),
            phase,
        }),
        Some(_) => Ok(()),
    }
}

/// A root Enqueue into a run that already has another root action `root`.
pub fn second_root(run: &super::RunId, root: &str) -> Error {
    Error::AlreadyExists(format!(
        "run {run} already exists with root action '{root}'"
    ))
}

/// The queue a new action waits in: task actions only, their own queue,
/// else the run's (RunSpec.queue), else `default`. Other kinds never wait
/// for an executor.
pub fn enqueue_queue(
    kind: ActionKind,
    task_queue: Option<&str>,
    run_queue: Option<&str>,
) -> Option<String> {
    (kind == ActionKind::Task).then(|| task_queue.or(run_queue).unwrap_or(DEFAULT_QUEUE).to_owned())
}

/// The queue of task actions that name none, in a run that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// The phase a new action starts in: tasks wait QUEUED for an executor,
/// conditions PAUSED for a signal, traces in the phase they report
/// (SUCCEEDED when they report none).
pub fn initial_phase(kind: ActionKind, reported: Option<Phase>) -> Phase {
    match kind {
        ActionKind::Task => Phase::Queued,
        ActionKind::Condition => Phase::Paused,
        ActionKind::Trace => reported.unwrap_or(Phase::Succeeded),
    }
}

/// Decides an Abort: only a live action can be aborted (its whole subtree
/// is then aborted, live descendants of terminal children included).
pub fn decide_abort(id: &ActionId, current: &Current) -> Result<(), Error> {
    if current.phase.is_terminal() {
        return Err(Error::FailedPrecondition(format!(
            "action {id} is already {}",
            current.phase
        )));
    }
    Ok(())
}

fn simple_type_name(value: i32) -> String {
    const NAMES: [&str; 10] = [
        "NONE", "INTEGER", "FLOAT", "STRING", "BOOLEAN", "DATETIME", "DURATION", "BINARY", "ERROR",
        "STRUCT",
    ];
    usize::try_from(value)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| value.to_string(), |n| (*n).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SignalValue, SimpleKind};

    fn id() -> ActionId {
        ActionId::in_test_run("a1")
    }

    fn task(phase: Phase, attempt: u32) -> Current {
        Current {
            kind: ActionKind::Task,
            phase,
            attempt,
            parent: Some("a0".into()),
            condition_type: None,
            value: None,
            lease_holder: None,
            run_output_base: String::new(),
            address: None,
        }
    }

    fn update(phase: Phase, attempt: u32) -> UpdateStatus {
        UpdateStatus {
            by: None,
            id: id(),
            attempt,
            phase,
            start_time: None,
            end_time: None,
            address: None,
        }
    }

    #[test]
    fn forward_moves_are_accepted_and_backward_refused() {
        let t = decide_update(&id(), &task(Phase::Queued, 1), &update(Phase::Running, 1));
        assert_eq!(
            t.unwrap(),
            Some(Transition {
                phase: Phase::Running,
                attempt: 1
            })
        );
        let back = decide_update(&id(), &task(Phase::Running, 1), &update(Phase::Queued, 1));
        assert!(matches!(back, Err(Error::FailedPrecondition(_))));
        let same = decide_update(&id(), &task(Phase::Running, 1), &update(Phase::Running, 1));
        assert_eq!(same.unwrap(), None);
        let pause = decide_update(&id(), &task(Phase::Running, 1), &update(Phase::Paused, 1));
        assert!(pause.unwrap().is_some());
    }

    #[test]
    fn attempts_and_terminal_phases() {
        let stale = decide_update(&id(), &task(Phase::Running, 2), &update(Phase::Running, 1));
        assert!(matches!(stale, Err(Error::FailedPrecondition(m)) if m.contains("stale")));
        let retry = decide_update(&id(), &task(Phase::Running, 1), &update(Phase::Queued, 2));
        assert_eq!(retry.unwrap().unwrap().attempt, 2);
        let repeat = decide_update(
            &id(),
            &task(Phase::Succeeded, 1),
            &update(Phase::Succeeded, 1),
        );
        assert_eq!(repeat.unwrap(), None);
        let other = decide_update(&id(), &task(Phase::Succeeded, 1), &update(Phase::Failed, 1));
        assert!(matches!(other, Err(Error::FailedPrecondition(_))));
        let revive = decide_update(&id(), &task(Phase::Aborted, 1), &update(Phase::Running, 2));
        assert!(matches!(revive, Err(Error::FailedPrecondition(_))));
    }

    #[test]
    fn a_new_address_is_a_change_and_the_same_one_is_not() {
        let at = |a: &'static [u8]| UpdateStatus {
            by: None,
            address: Some(Bytes::from_static(a)),
            ..update(Phase::Running, 1)
        };
        let mut running = task(Phase::Running, 1);
        assert!(decide_update(&id(), &running, &at(b"pod-1"))
            .unwrap()
            .is_some());
        running.address = Some(Bytes::from_static(b"pod-1"));
        assert_eq!(decide_update(&id(), &running, &at(b"pod-1")).unwrap(), None);
        assert_eq!(
            decide_update(&id(), &running, &update(Phase::Running, 1)).unwrap(),
            None
        );
        // Above 2^31 the stale-attempt rule holds as below it.
        let high = task(Phase::Running, u32::MAX);
        let stale = decide_update(&id(), &high, &update(Phase::Queued, 3_000_000_000));
        assert!(matches!(stale, Err(Error::FailedPrecondition(m)) if m.contains("stale")));
    }

    #[test]
    fn signal_rules() {
        let cond = |phase, value: Option<&'static [u8]>| Current {
            kind: ActionKind::Condition,
            phase,
            attempt: 1,
            parent: Some("a0".into()),
            condition_type: Some(SimpleKind::Boolean as i32),
            value: value.map(Bytes::from_static),
            lease_holder: None,
            run_output_base: String::new(),
            address: None,
        };
        let signal = |kind, literal: &'static [u8]| SignalAction {
            by: None,
            id: id(),
            parent: "a0".into(),
            value: SignalValue {
                kind,
                literal: Bytes::from_static(literal),
            },
            signalled_by: None,
        };
        let yes = signal(SimpleKind::Boolean, b"yes");
        assert!(decide_signal(&id(), &cond(Phase::Paused, None), &yes).unwrap());
        assert!(!decide_signal(&id(), &cond(Phase::Succeeded, Some(b"yes")), &yes).unwrap());
        assert!(matches!(
            decide_signal(&id(), &cond(Phase::Succeeded, Some(b"no")), &yes),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            decide_signal(&id(), &cond(Phase::Paused, None), &signal(SimpleKind::Integer, b"1")),
            Err(Error::InvalidArgument { field, .. }) if field == "value"
        ));
        assert!(matches!(
            decide_signal(&id(), &task(Phase::Running, 1), &yes),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
