//! Rows as both backends read them: phases and kinds bound and decoded as
//! their stored small integers, and the columns of an action's observable
//! state decoded by `FromRow`.

use bytes::Bytes;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

use chrono::{DateTime, Utc};

use crate::domain::{
    output_uri, ActionId, ActionKind, ActionRecord, ActionState, EnqueueAction, Error,
    HistoryEntry, Lease, Phase, RunId, SnapshotPosition,
};

/// Implements `Type`, `Encode` and `Decode` for a domain enum stored as
/// its `i16` discriminant, on every backend.
macro_rules! stored_as_i16 {
    ($ty:ty, $what:literal, $from:expr) => {
        impl<DB: Database> Type<DB> for $ty
        where
            i16: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <i16 as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <i16 as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $ty
        where
            i16: Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                (*self as i16).encode_by_ref(buf)
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $ty
        where
            i16: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let stored = <i16 as Decode<'r, DB>>::decode(value)?;
                let from: fn(i16) -> Option<$ty> = $from;
                from(stored)
                    .ok_or_else(|| format!("unknown {} {stored} in the store", $what).into())
            }
        }

        /// Bound as an array (`int2[]`) by Postgres's set-wise writes.
        impl sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <i16 as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}

stored_as_i16!(Phase, "phase", |v| Phase::from_wire(i32::from(v)));
stored_as_i16!(ActionKind, "action kind", ActionKind::from_db);

/// The phases [`Phase::is_terminal`] names, as an SQL list `(5, 6, …)`:
/// derived, so the SQL cannot disagree with the rule.
pub(crate) fn terminal_phases() -> &'static str {
    static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let phases: Vec<String> = (1..=16)
            .filter_map(Phase::from_wire)
            .filter(|p| p.is_terminal())
            .map(|p| (p as i16).to_string())
            .collect();
        format!("({})", phases.join(", "))
    })
}

/// The predicate of queued task actions (what claims take), for the
/// columns of `alias`: it matches the partial index `actions_queued_idx`,
/// which is why it is spelled out rather than bound.
pub(crate) fn queued_task(alias: &str) -> String {
    format!(
        "{alias}phase = {} AND {alias}kind = {}",
        Phase::Queued as i16,
        ActionKind::Task as i16
    )
}

/// The predicate of conditions waiting for a signal, matching the partial
/// index `actions_condition_deadline_idx`.
pub(crate) fn waiting_condition() -> String {
    format!(
        "kind = {} AND phase = {}",
        ActionKind::Condition as i16,
        crate::domain::initial_phase(ActionKind::Condition, None) as i16
    )
}

/// An action's key columns.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct IdRow {
    pub org: String,
    pub project: String,
    pub domain: String,
    pub run_name: String,
    pub name: String,
}

impl IdRow {
    pub fn into_id(self) -> ActionId {
        ActionId::new(
            RunId {
                org: self.org,
                project: self.project,
                domain: self.domain,
                name: self.run_name,
            },
            self.name,
        )
    }
}

/// The columns of an action's observable state (of `actions` or of
/// `events`): `state_columns!` in each backend.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StateRow {
    #[sqlx(flatten)]
    pub id: IdRow,
    pub parent_name: Option<String>,
    pub version: i64,
    pub phase: Phase,
    pub attempt: i64,
    pub output_uri: String,
    pub error: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub queue: Option<String>,
    pub lease_holder: Option<String>,
    /// Events written before they carried the kind hold 0: no default.
    pub kind: i16,
    pub run_output_base: String,
    pub address: Option<Vec<u8>>,
}

impl StateRow {
    pub fn into_state(self) -> Result<ActionState, Error> {
        let id = self.id.into_id();
        let attempt = attempt_from_db(self.attempt)?;
        Ok(ActionState {
            output_uri: match ActionKind::from_db(self.kind) {
                Some(kind) => output_uri(
                    kind,
                    &self.output_uri,
                    &self.run_output_base,
                    &id.name,
                    attempt,
                ),
                None => self.output_uri,
            },
            id,
            parent: self.parent_name,
            version: self.version,
            phase: self.phase,
            attempt,
            error: self.error.map(Bytes::from),
            value: self.value.map(Bytes::from),
            queue: self.queue,
            lease_holder: self.lease_holder,
            address: self.address.map(Bytes::from),
        })
    }
}

/// What the rules read of an action's row (`Current`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct CurrentRow {
    pub kind: ActionKind,
    pub phase: Phase,
    pub attempt: i64,
    pub parent_name: Option<String>,
    pub condition_type: Option<i32>,
    pub value: Option<Vec<u8>>,
    pub lease_holder: Option<String>,
    pub run_output_base: String,
    pub address: Option<Vec<u8>>,
}

impl CurrentRow {
    pub fn into_current(self) -> Result<crate::domain::Current, Error> {
        Ok(crate::domain::Current {
            kind: self.kind,
            phase: self.phase,
            attempt: attempt_from_db(self.attempt)?,
            parent: self.parent_name,
            condition_type: self.condition_type,
            value: self.value.map(Bytes::from),
            lease_holder: self.lease_holder,
            run_output_base: self.run_output_base,
            address: self.address.map(Bytes::from),
        })
    }
}

/// The stored content of an existing action, for a repeated Enqueue.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredRow {
    pub spec: Vec<u8>,
    pub run_spec: Vec<u8>,
    pub is_root: bool,
}

impl From<StoredRow> for crate::store::apply::Stored {
    fn from(row: StoredRow) -> Self {
        Self {
            spec: row.spec,
            run_spec: row.run_spec,
            is_root: row.is_root,
        }
    }
}

/// A lease released because its action ended.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ReleasedRow {
    #[sqlx(flatten)]
    pub id: IdRow,
    pub attempt: i64,
    pub phase: Phase,
    pub abort_reason: Option<String>,
}

impl ReleasedRow {
    pub fn into_released(self) -> Result<crate::store::lease::Released, Error> {
        Ok(crate::store::lease::Released {
            id: self.id.into_id(),
            attempt: attempt_from_db(self.attempt)?,
            phase: self.phase,
            abort_reason: self.abort_reason,
        })
    }
}

/// A stored time: a `timestamptz` on Postgres (decoded with checked
/// arithmetic, `postgres/time.rs`), microseconds since the Unix epoch on
/// SQLite (`sqlite.rs`). A value out of range fails the read of its row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredTime(pub DateTime<Utc>);

/// A lease as claims and `leases_of` return it: the action's key columns,
/// `spec`, `attempt`, `lease_deadline`, `run_output_base` and the run's
/// `run_spec`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LeaseRow {
    #[sqlx(flatten)]
    pub id: IdRow,
    pub spec: Vec<u8>,
    pub run_spec: Vec<u8>,
    pub attempt: i64,
    pub lease_deadline: StoredTime,
    pub run_output_base: String,
}

impl LeaseRow {
    pub fn into_lease(self) -> Result<Lease, Error> {
        let id = self.id.into_id();
        let attempt = attempt_from_db(self.attempt)?;
        Ok(Lease {
            output_uri: output_uri(
                ActionKind::Task,
                "",
                &self.run_output_base,
                &id.name,
                attempt,
            ),
            id,
            spec: Bytes::from(self.spec),
            run_spec: Bytes::from(self.run_spec),
            attempt,
            deadline: self.lease_deadline.0,
        })
    }
}

/// An [`ActionRecord`]: `state_columns!`, then `spec, lease_deadline,
/// abort_reason, aborted_by, signalled_by, created_at, updated_at,
/// start_time, end_time, deadline`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RecordRow {
    #[sqlx(flatten)]
    pub state: StateRow,
    #[sqlx(rename = "kind")]
    pub action_kind: ActionKind,
    pub spec: Vec<u8>,
    pub lease_deadline: Option<StoredTime>,
    pub abort_reason: Option<String>,
    pub aborted_by: Option<Vec<u8>>,
    pub signalled_by: Option<Vec<u8>>,
    pub created_at: StoredTime,
    pub updated_at: StoredTime,
    pub start_time: Option<StoredTime>,
    pub end_time: Option<StoredTime>,
    pub deadline: Option<StoredTime>,
}

impl RecordRow {
    pub fn into_record(self) -> Result<ActionRecord, Error> {
        let time = |t: Option<StoredTime>| t.map(|t| t.0);
        Ok(ActionRecord {
            state: self.state.into_state()?,
            kind: self.action_kind,
            spec: Bytes::from(self.spec),
            lease_deadline: time(self.lease_deadline),
            abort_reason: self.abort_reason,
            aborted_by: self.aborted_by.map(Bytes::from),
            signalled_by: self.signalled_by.map(Bytes::from),
            created_at: self.created_at.0,
            updated_at: self.updated_at.0,
            start_time: time(self.start_time),
            end_time: time(self.end_time),
            deadline: time(self.deadline),
        })
    }
}

/// One event of an action's history: `state_columns!`, `created_at`,
/// `changed_by`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct HistoryRow {
    #[sqlx(flatten)]
    pub state: StateRow,
    pub created_at: StoredTime,
    pub changed_by: Option<String>,
}

impl HistoryRow {
    pub fn into_entry(self) -> Result<HistoryEntry, Error> {
        Ok(HistoryEntry {
            state: self.state.into_state()?,
            at: self.created_at.0,
            by: self.changed_by,
        })
    }
}

/// A watch snapshot's row: `state_columns!`, `created_at`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SnapshotRow {
    #[sqlx(flatten)]
    pub state: StateRow,
    pub created_at: StoredTime,
}

impl SnapshotRow {
    pub fn into_entry(self) -> Result<(ActionState, SnapshotPosition), Error> {
        let state = self.state.into_state()?;
        let position = SnapshotPosition {
            created_at: self.created_at.0,
            name: state.id.name.clone(),
        };
        Ok((state, position))
    }
}

/// An event as the feed reads it: its position (`major`, `minor`), when
/// it was written (`written_micros`, microseconds since the epoch) and
/// `state_columns!`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FeedRow {
    pub major: i64,
    pub minor: i64,
    pub written_micros: i64,
    #[sqlx(flatten)]
    pub state: StateRow,
}

/// One row of `listing::runs_page`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RunPhaseRow {
    pub org: String,
    pub project: String,
    pub domain: String,
    pub run_name: String,
    pub root_name: String,
    pub root_phase: Phase,
    pub queue: Option<String>,
    pub created_at: StoredTime,
    pub phase: Phase,
    pub actions: i64,
}

/// A parent's phase and its run's queue.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ParentRow {
    pub phase: Phase,
    pub queue: Option<String>,
}

pub(crate) fn attempt_from_db(value: i64) -> Result<u32, Error> {
    u32::try_from(value)
        .map_err(|_| Error::Internal(format!("attempt {value} in the store is out of range")))
}

/// Binds an action's key columns (org, project, domain, run name, name),
/// in that order, to the next five parameters.
pub(crate) trait BindId<'q> {
    fn bind_id(self, id: &'q ActionId) -> Self;
}

impl<'q, DB: Database> BindId<'q> for sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    &'q String: Encode<'q, DB> + Type<DB>,
{
    fn bind_id(self, id: &'q ActionId) -> Self {
        self.bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(&id.name)
    }
}

impl<'q, DB: Database, O> BindId<'q>
    for sqlx::query::QueryAs<'q, DB, O, <DB as Database>::Arguments<'q>>
where
    &'q String: Encode<'q, DB> + Type<DB>,
{
    fn bind_id(self, id: &'q ActionId) -> Self {
        self.bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(&id.name)
    }
}

impl<'q, DB: Database, O> BindId<'q>
    for sqlx::query::QueryScalar<'q, DB, O, <DB as Database>::Arguments<'q>>
where
    &'q String: Encode<'q, DB> + Type<DB>,
{
    fn bind_id(self, id: &'q ActionId) -> Self {
        self.bind(&id.run.org)
            .bind(&id.run.project)
            .bind(&id.run.domain)
            .bind(&id.run.name)
            .bind(&id.name)
    }
}

/// Binds a new action's columns as `$1..$12`: its key, then parent_name,
/// kind, phase, spec, queue, output_uri and condition_type.
pub(crate) trait BindNewAction<'q> {
    fn bind_new_action(self, action: &'q EnqueueAction, queue: Option<&'q str>) -> Self;
}

impl<'q, DB: Database> BindNewAction<'q>
    for sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    &'q String: Encode<'q, DB> + Type<DB>,
    &'q Option<String>: Encode<'q, DB> + Type<DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    Option<i32>: Encode<'q, DB> + Type<DB>,
    ActionKind: Encode<'q, DB> + Type<DB>,
    Phase: Encode<'q, DB> + Type<DB>,
{
    fn bind_new_action(self, action: &'q EnqueueAction, queue: Option<&'q str>) -> Self {
        self.bind_id(&action.id)
            .bind(&action.parent)
            .bind(action.kind)
            .bind(action.phase)
            .bind(action.spec.as_ref())
            .bind(queue)
            .bind(&action.output_uri)
            .bind(action.condition_type)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_terminal_list_follows_the_rule() {
        assert_eq!(super::terminal_phases(), "(5, 6, 7, 8, 10)");
    }
}
