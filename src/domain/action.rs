use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{ActionId, Phase};

/// What an action is. Stored as a small integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub enum ActionKind {
    /// Run by an executor.
    Task = 1,
    /// Already computed by the client; stored as given, never run.
    Trace = 2,
    /// Waits for a Signal.
    Condition = 3,
}

impl ActionKind {
    pub fn from_db(value: i16) -> Option<Self> {
        match value {
            1 => Some(Self::Task),
            2 => Some(Self::Trace),
            3 => Some(Self::Condition),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Trace => "trace",
            Self::Condition => "condition",
        }
    }
}

/// The literal kinds a condition can be signalled with. Numbered as
/// `flyteidl2.core.SimpleType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum SimpleKind {
    Integer = 1,
    Float = 2,
    String = 3,
    Boolean = 4,
}

impl SimpleKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Integer => "INTEGER",
            Self::Float => "FLOAT",
            Self::String => "STRING",
            Self::Boolean => "BOOLEAN",
        }
    }
}

/// Run-wide settings, given with the root action's Enqueue and inherited by
/// every descendant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunSettings {
    /// The RunSpec bytes exactly as received (empty when none was sent).
    pub run_spec: Bytes,
    /// RunSpec.queue, when set.
    pub queue: Option<String>,
    /// RunSpec.max_action_concurrency; 0 means unlimited.
    pub max_action_concurrency: u32,
}

/// A validated Enqueue.
#[derive(Debug, Clone)]
pub struct EnqueueAction {
    pub id: ActionId,
    /// The parent's name; `None` for the root action of a run.
    pub parent: Option<String>,
    pub kind: ActionKind,
    /// The `Action` message as enqueued. Compared byte for byte on a
    /// repeated Enqueue and handed unchanged to executors.
    pub spec: Bytes,
    /// Present on a root action only; children inherit the run's settings.
    pub run: Option<RunSettings>,
    /// TaskAction.queue when non-empty.
    pub task_queue: Option<String>,
    /// The phase the action starts in.
    pub phase: Phase,
    /// Initial output location (traces carry theirs).
    pub output_uri: String,
    /// Action.run_output_base: attempts write under it by default.
    pub run_output_base: String,
    /// For conditions: the declared `SimpleType`, when the type is simple.
    pub condition_type: Option<i32>,
    /// For conditions: how long to wait for a signal.
    pub condition_timeout: Option<Duration>,
    /// The authenticated principal that asked for the change, recorded
    /// with its event (`None` without authentication).
    pub by: Option<String>,
}

/// A validated Update from an executor.
#[derive(Debug, Clone)]
pub struct UpdateStatus {
    pub id: ActionId,
    pub attempt: u32,
    pub phase: Phase,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// The encoded `ActionAddress` the executor reported, when given; the
    /// latest one is kept.
    pub address: Option<Bytes>,
    /// The authenticated principal that asked for the change, recorded
    /// with its event (`None` without authentication).
    pub by: Option<String>,
}

/// A validated Abort.
#[derive(Debug, Clone)]
pub struct AbortAction {
    pub id: ActionId,
    pub reason: String,
    /// The encoded `EnrichedIdentity` of who aborted, when given.
    pub aborted_by: Option<Bytes>,
    /// The encoded `ExecutionError` every aborted action reports.
    pub error: Bytes,
    /// The authenticated principal that asked for the change, recorded
    /// with its event (`None` without authentication).
    pub by: Option<String>,
}

/// A validated signal value: the literal as sent and its primitive kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalValue {
    pub kind: SimpleKind,
    /// The encoded `Literal`, delivered to watchers in ActionUpdate.value.
    pub literal: Bytes,
}

/// A validated Signal.
#[derive(Debug, Clone)]
pub struct SignalAction {
    pub id: ActionId,
    pub parent: String,
    pub value: SignalValue,
    /// The encoded `EnrichedIdentity` of who signalled, when given.
    pub signalled_by: Option<Bytes>,
    /// The authenticated principal that asked for the change, recorded
    /// with its event (`None` without authentication).
    pub by: Option<String>,
}

/// A change request. Writes reach the store as commands so that a store can
/// apply several of them in one transaction.
#[derive(Debug, Clone)]
pub enum Command {
    Enqueue(EnqueueAction),
    Update(UpdateStatus),
    Abort(AbortAction),
    Signal(SignalAction),
    Finish(super::FinishAction),
}

impl Command {
    pub fn action_id(&self) -> &ActionId {
        match self {
            Self::Enqueue(c) => &c.id,
            Self::Update(c) => &c.id,
            Self::Abort(c) => &c.id,
            Self::Signal(c) => &c.id,
            Self::Finish(c) => &c.id,
        }
    }

    /// Records who asks for the change.
    pub fn set_by(&mut self, by: String) {
        let slot = match self {
            Self::Enqueue(c) => &mut c.by,
            Self::Update(c) => &mut c.by,
            Self::Abort(c) => &mut c.by,
            Self::Signal(c) => &mut c.by,
            Self::Finish(c) => &mut c.by,
        };
        *slot = Some(by);
    }
}

/// The observable state of one action at one version: what a watcher sees.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionState {
    pub id: ActionId,
    pub parent: Option<String>,
    pub version: i64,
    pub phase: Phase,
    pub attempt: u32,
    pub output_uri: String,
    /// The encoded `ExecutionError`, when the action failed or was aborted.
    pub error: Option<Bytes>,
    /// The encoded `Literal` a condition was signalled with.
    pub value: Option<Bytes>,
    /// The queue of a task action.
    pub queue: Option<String>,
    /// The executor that holds (or last held) a lease on the action.
    pub lease_holder: Option<String>,
    /// The encoded `ActionAddress` last reported for the action.
    pub address: Option<Bytes>,
}

/// A committed change: the state it produced. Events are read back from the
/// store's event log by the pipeline, never from the write path.
pub type Event = ActionState;
