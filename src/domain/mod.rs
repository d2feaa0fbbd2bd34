//! The action model: identifiers, phases, commands, state and the rules
//! that decide whether a change is accepted. Nothing here does I/O, so the
//! same rules serve every store backend.

mod action;
mod error;
mod executor;
mod ids;
pub mod limits;
mod phase;
mod read;
mod rules;

pub use action::{
    AbortAction, ActionKind, ActionState, Command, EnqueueAction, Event, RunSettings, SignalAction,
    SignalValue, SimpleKind, UpdateStatus,
};
pub use error::Error;
pub use executor::{
    decide_finish, finishable, output_uri, Cancellation, ClaimRequest, FinishAction,
    HeartbeatOutcome, Lease, LeaseExpiry, ReapOutcome, ReapSettings, CONDITION_TIMEOUT_PHASE,
};
pub use ids::{ActionId, RunId, WatchKey, EMPTY_ORG_ALIAS};
pub use phase::Phase;
pub use read::{
    ActionFilter, ActionPosition, ActionRecord, HistoryEntry, Page, PageRequest, RunFilter,
    RunPosition, RunRecord, SnapshotPosition, PAGE_BUDGET,
};
pub use rules::{
    decide_abort, decide_enqueue_existing, decide_enqueue_parent, decide_signal, decide_update,
    enqueue_queue, initial_phase, second_root, Current, Transition, DEFAULT_QUEUE,
};
