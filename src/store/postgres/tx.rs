//! The statements of a Postgres write transaction ([`CommandTx`]).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{db_error, trip};
use chrono::{DateTime, Utc};

use crate::domain::{
    AbortAction, ActionId, ActionKind, Command, Current, EnqueueAction, Error, FinishAction, Phase,
    RunSettings, SignalAction, Transition, UpdateStatus,
};
use crate::store::apply::{CommandTx, FoundParent, NewAction, RunRoot, Stored};
use crate::store::rows::{
    terminal_phases, BindId, BindNewAction, CurrentRow, IdRow, ParentRow, StoredRow,
};
use crate::store::sql;

/// A transaction's connection, with what [`CommandTx::prefetch`] read for
/// its batch.
pub(super) struct PgTx<'c> {
    pub conn: &'c mut PgConnection,
    read: Prefetched,
    /// Writes held back to be applied set-wise ([`Pending`]); only in a
    /// batch (after [`CommandTx::prefetch`]).
    pending: Option<Pending>,
}

/// The writes of a batch not applied yet: inserts, Updates and Finishes,
/// each kind applied by one statement for all of them (`unnest` of
/// arrays). At most one write per action is held: a command that touches
/// an action with a held write, and any read the prefetch cannot answer,
/// first applies what is held, so every statement sees the rows as the
/// earlier commands wrote them, and each action's events keep their order.
#[derive(Default)]
struct Pending {
    inserts: Vec<(EnqueueAction, Option<String>)>,
    updates: Vec<(UpdateStatus, Transition)>,
    finishes: Vec<(FinishAction, String)>,
    ids: HashSet<ActionId>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Rows read for a batch, by action. An entry holds `None` when the action
/// does not exist. Entries of an action the batch writes are dropped, so
/// what the next command reads is the row as written.
#[derive(Default)]
struct Prefetched {
    stored: HashMap<ActionId, Option<Stored>>,
    parents: HashMap<ActionId, Option<(Phase, Option<String>)>>,
    current: HashMap<ActionId, Option<Current>>,
}

impl<'c> PgTx<'c> {
    pub fn new(conn: &'c mut PgConnection) -> Self {
        Self {
            conn,
            read: Prefetched::default(),
            pending: None,
        }
    }

    /// Drops what was read of `id` once the batch writes it.
    fn forget(&mut self, id: &ActionId) {
        self.read.stored.remove(id);
        self.read.parents.remove(id);
        self.read.current.remove(id);
    }
}

/// The key columns of `ids` as five arrays, for `unnest`.
fn key_arrays(ids: &[&ActionId]) -> [Vec<String>; 5] {
    let column = |get: fn(&ActionId) -> &String| ids.iter().map(|id| get(id).clone()).collect();
    [
        column(|id| &id.run.org),
        column(|id| &id.run.project),
        column(|id| &id.run.domain),
        column(|id| &id.run.name),
        column(|id| &id.name),
    ]
}

/// Selects from `actions a` the rows of the keys bound as `$1..$5` arrays.
///
/// Columns of an action's run are read by [`of_run!`] subqueries rather
/// than a join: joined, a generic plan could match the keys to `runs`
/// first and then read every action of each run by the primary key's
/// prefix, filtering on name. With `actions` alone beside the keys, each
/// key is one probe of the primary key.
macro_rules! of_keys {
    () => {
        " FROM actions a \
          WHERE (a.org, a.project, a.domain, a.run_name, a.name) IN ( \
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])) \
          ORDER BY a.org, a.project, a.domain, a.run_name, a.name"
    };
}

/// A column of the run of `actions a`: one probe of `runs_pkey`.
macro_rules! of_run {
    ($column:literal) => {
        concat!(
            "(SELECT r.",
            $column,
            " FROM runs r WHERE (r.org, r.project, r.domain, r.name) \
               = (a.org, a.project, a.domain, a.run_name))"
        )
    };
}

impl PgTx<'_> {
    /// The stored content of `ids`, in one statement.
    async fn prefetch_stored(&mut self, ids: &[&ActionId]) -> Result<(), Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            id: IdRow,
            #[sqlx(flatten)]
            stored: StoredRow,
        }
        trip();
        let [org, project, domain, run, name] = key_arrays(ids);
        let rows: Vec<Row> = sqlx::query_as(concat!(
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.spec,",
            of_run!("run_spec"),
            " AS run_spec, ",
            of_run!("root_name"),
            " = a.name AS is_root",
            of_keys!()
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_error)?;
        for id in ids {
            self.read.stored.insert((*id).clone(), None);
        }
        for row in rows {
            let stored = Stored::from(row.stored);
            self.read.stored.insert(row.id.into_id(), Some(stored));
        }
        Ok(())
    }

    /// Parents' phases and run queues, `FOR SHARE`, in one statement.
    async fn prefetch_parents(&mut self, ids: &[&ActionId]) -> Result<(), Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            id: IdRow,
            #[sqlx(flatten)]
            parent: ParentRow,
        }
        trip();
        let [org, project, domain, run, name] = key_arrays(ids);
        let rows: Vec<Row> = sqlx::query_as(concat!(
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.phase, ",
            of_run!("queue"),
            " AS queue",
            of_keys!(),
            " FOR SHARE OF a"
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_error)?;
        for id in ids {
            self.read.parents.insert((*id).clone(), None);
        }
        for row in rows {
            let parent = (row.parent.phase, row.parent.queue);
            self.read.parents.insert(row.id.into_id(), Some(parent));
        }
        Ok(())
    }

    /// The rows the rules read, `FOR UPDATE`, in one statement.
    async fn prefetch_current(&mut self, ids: &[&ActionId]) -> Result<(), Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            id: IdRow,
            #[sqlx(flatten)]
            current: CurrentRow,
        }
        trip();
        let [org, project, domain, run, name] = key_arrays(ids);
        let rows: Vec<Row> = sqlx::query_as(concat!(
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.kind, a.phase, a.attempt,",
            " a.parent_name, a.condition_type, a.value, a.lease_holder, a.run_output_base, a.address",
            of_keys!(),
            " FOR UPDATE OF a"
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_error)?;
        for id in ids {
            self.read.current.insert((*id).clone(), None);
        }
        for row in rows {
            let current = row.current.into_current()?;
            self.read.current.insert(row.id.into_id(), Some(current));
        }
        Ok(())
    }
}

/// Keys `$1..$5` and the values of a batch of writes, as one row set `v`.
macro_rules! unnest_keys {
    ($rest:literal, $columns:literal) => {
        concat!(
            "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], ",
            $rest,
            ") AS v(org, project, domain, run_name, name, ",
            $columns,
            "))"
        )
    };
}

/// Matches the rows of `actions a` to the rows of `v` by key.
macro_rules! where_v {
    () => {
        " FROM v WHERE (a.org, a.project, a.domain, a.run_name, a.name) \
           = (v.org, v.project, v.domain, v.run_name, v.name)"
    };
}

impl PgTx<'_> {
    /// Whether a write of `id` is held back for the batch's set-wise
    /// statements; a write already held for `id` is applied first.
    async fn hold(&mut self, id: &ActionId) -> Result<bool, Error> {
        self.forget(id);
        let held = match &self.pending {
            None => return Ok(false),
            Some(pending) => pending.ids.contains(id),
        };
        if held {
            self.apply_pending().await?;
        }
        if let Some(pending) = &mut self.pending {
            pending.ids.insert(id.clone());
        }
        Ok(true)
    }

    fn pending(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Pending::default)
    }

    /// Applies the held writes: one statement per kind of write.
    async fn apply_pending(&mut self) -> Result<(), Error> {
        let Some(pending) = self.pending.as_mut().filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let Pending {
            inserts,
            updates,
            finishes,
            ..
        } = std::mem::take(pending);
        if !inserts.is_empty() {
            self.insert_all(&inserts).await?;
        }
        if !updates.is_empty() {
            self.update_all(&updates).await?;
        }
        if !finishes.is_empty() {
            self.finish_all(&finishes).await?;
        }
        Ok(())
    }

    /// Inserts actions with their first events. Every one was found
    /// missing by the prefetch: one that exists by now (a concurrent
    /// Enqueue of another daemon) is a conflict, and the batch is applied
    /// again command by command.
    async fn insert_all(
        &mut self,
        inserts: &[(EnqueueAction, Option<String>)],
    ) -> Result<(), Error> {
        trip();
        let ids: Vec<&ActionId> = inserts.iter().map(|(a, _)| &a.id).collect();
        let [org, project, domain, run, name] = key_arrays(&ids);
        let parent: Vec<Option<&str>> = inserts.iter().map(|(a, _)| a.parent.as_deref()).collect();
        let kind: Vec<ActionKind> = inserts.iter().map(|(a, _)| a.kind).collect();
        let phase: Vec<Phase> = inserts.iter().map(|(a, _)| a.phase).collect();
        let spec: Vec<&[u8]> = inserts.iter().map(|(a, _)| a.spec.as_ref()).collect();
        let queue: Vec<Option<&str>> = inserts.iter().map(|(_, q)| q.as_deref()).collect();
        let output_uri: Vec<&str> = inserts.iter().map(|(a, _)| a.output_uri.as_str()).collect();
        let condition: Vec<Option<i32>> = inserts.iter().map(|(a, _)| a.condition_type).collect();
        let timeout: Vec<Option<f64>> = inserts
            .iter()
            .map(|(a, _)| a.condition_timeout.map(|t| t.as_secs_f64()))
            .collect();
        let base: Vec<&str> = inserts
            .iter()
            .map(|(a, _)| a.run_output_base.as_str())
            .collect();
        let by: Vec<Option<&str>> = inserts.iter().map(|(a, _)| a.by.as_deref()).collect();
        let inserted = sqlx::query(concat!(
            unnest_keys!(
                "$6::text[], $7::int2[], $8::int2[], $9::bytea[], $10::text[], $11::text[], \
                 $12::int4[], $13::float8[], $14::text[], $15::text[]",
                "parent_name, kind, phase, spec, queue, output_uri, condition_type, timeout, \
                 run_output_base, changed_by"
            ),
            ", changed AS (",
            " INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,",
            "   output_uri, condition_type, deadline, run_output_base)",
            " SELECT org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,",
            "   output_uri, condition_type, now() + make_interval(secs => timeout), run_output_base FROM v",
            " ON CONFLICT ON CONSTRAINT actions_pkey DO NOTHING",
            " RETURNING ",
            state_columns!(),
            ") INSERT INTO events (",
            state_columns!(),
            ", changed_by) SELECT c.*, v.changed_by FROM changed c",
            " JOIN v USING (org, project, domain, run_name, name)"
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .bind(parent)
        .bind(kind)
        .bind(phase)
        .bind(spec)
        .bind(queue)
        .bind(output_uri)
        .bind(condition)
        .bind(timeout)
        .bind(base)
        .bind(by)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        expect_rows(inserted, inserts.len())
    }

    /// Writes accepted Updates (of rows the batch has locked).
    async fn update_all(&mut self, updates: &[(UpdateStatus, Transition)]) -> Result<(), Error> {
        trip();
        let ids: Vec<&ActionId> = updates.iter().map(|(u, _)| &u.id).collect();
        let [org, project, domain, run, name] = key_arrays(&ids);
        let phase: Vec<Phase> = updates.iter().map(|(_, t)| t.phase).collect();
        let attempt: Vec<i64> = updates.iter().map(|(_, t)| i64::from(t.attempt)).collect();
        let start: Vec<Option<DateTime<Utc>>> = updates.iter().map(|(u, _)| u.start_time).collect();
        let terminal: Vec<bool> = updates.iter().map(|(_, t)| t.phase.is_terminal()).collect();
        let end: Vec<Option<DateTime<Utc>>> = updates.iter().map(|(u, _)| u.end_time).collect();
        let address: Vec<Option<&[u8]>> =
            updates.iter().map(|(u, _)| u.address.as_deref()).collect();
        let by: Vec<Option<&str>> = updates.iter().map(|(u, _)| u.by.as_deref()).collect();
        let updated = sqlx::query(concat!(
            unnest_keys!(
                "$6::int2[], $7::int8[], $8::timestamptz[], $9::bool[], $10::timestamptz[], \
                 $11::bytea[], $12::text[]",
                "phase, attempt, start_time, terminal, end_time, address, changed_by"
            ),
            ", changed AS (",
            " UPDATE actions a SET phase = v.phase, attempt = v.attempt, version = a.version + 1,",
            "   updated_at = now(), start_time = COALESCE(v.start_time, a.start_time),",
            "   end_time = CASE WHEN v.terminal THEN COALESCE(v.end_time, a.end_time, now()) ELSE a.end_time END,",
            "   address = COALESCE(v.address, a.address)",
            where_v!(),
            " RETURNING ",
            a_state_columns!(),
            ", v.changed_by)",
            " INSERT INTO events (",
            state_columns!(),
            ", changed_by) SELECT * FROM changed"
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .bind(phase)
        .bind(attempt)
        .bind(start)
        .bind(terminal)
        .bind(end)
        .bind(address)
        .bind(by)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        expect_rows(updated, updates.len())
    }

    /// Ends attempts (of rows the batch has locked) with their outputs.
    async fn finish_all(&mut self, finishes: &[(FinishAction, String)]) -> Result<(), Error> {
        trip();
        let ids: Vec<&ActionId> = finishes.iter().map(|(f, _)| &f.id).collect();
        let [org, project, domain, run, name] = key_arrays(&ids);
        let phase: Vec<Phase> = finishes.iter().map(|(f, _)| f.phase).collect();
        let output_uri: Vec<&str> = finishes.iter().map(|(_, uri)| uri.as_str()).collect();
        let error: Vec<Option<&[u8]>> = finishes.iter().map(|(f, _)| f.error.as_deref()).collect();
        let by: Vec<Option<&str>> = finishes.iter().map(|(f, _)| f.by.as_deref()).collect();
        let finished = sqlx::query(concat!(
            unnest_keys!(
                "$6::int2[], $7::text[], $8::bytea[], $9::text[]",
                "phase, output_uri, error, changed_by"
            ),
            ", changed AS (",
            " UPDATE actions a SET phase = v.phase, output_uri = v.output_uri, error = v.error,",
            "   lease_deadline = NULL, end_time = now(), version = a.version + 1, updated_at = now()",
            where_v!(),
            " RETURNING ",
            a_state_columns!(),
            ", v.changed_by)",
            " INSERT INTO events (",
            state_columns!(),
            ", changed_by) SELECT * FROM changed"
        ))
        .bind(org)
        .bind(project)
        .bind(domain)
        .bind(run)
        .bind(name)
        .bind(phase)
        .bind(output_uri)
        .bind(error)
        .bind(by)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        expect_rows(finished, finishes.len())
    }
}

/// A set-wise write that changed fewer rows than it was given met a row a
/// concurrent writer changed: the batch is applied again, command by
/// command.
fn expect_rows(changed: u64, given: usize) -> Result<(), Error> {
    if changed == given as u64 {
        Ok(())
    } else {
        Err(Error::Conflict)
    }
}

#[async_trait]
impl CommandTx for PgTx<'_> {
    async fn prefetch(&mut self, commands: &[Command]) -> Result<(), Error> {
        let mut enqueued = Vec::new();
        let mut parents = Vec::new();
        let mut changed = Vec::new();
        for command in commands {
            match command {
                Command::Enqueue(action) => {
                    enqueued.push(&action.id);
                    if let Some(parent) = &action.parent {
                        parents.push(action.id.sibling(parent.clone()));
                    }
                }
                other => changed.push(other.action_id()),
            }
        }
        // Distinct, in key order, so batches lock rows in one order.
        parents.sort_by_key(ToString::to_string);
        parents.dedup();
        if !enqueued.is_empty() {
            self.prefetch_stored(&enqueued).await?;
        }
        if !parents.is_empty() {
            let parents: Vec<&ActionId> = parents.iter().collect();
            self.prefetch_parents(&parents).await?;
        }
        if !changed.is_empty() {
            self.prefetch_current(&changed).await?;
        }
        self.pending = Some(Pending::default());
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.apply_pending().await
    }

    fn savepoints(&self) -> bool {
        false
    }

    async fn stored(&mut self, id: &ActionId) -> Result<Option<Stored>, Error> {
        if let Some(stored) = self.read.stored.get(id) {
            return Ok(stored.clone());
        }
        self.apply_pending().await?;
        trip();
        sql::stored(&mut *self.conn, id).await.map_err(db_error)
    }

    async fn insert_run(&mut self, id: &ActionId, run: &RunSettings) -> Result<RunRoot, Error> {
        sql::insert_run::<sqlx::Postgres, DateTime<Utc>>(self.conn, id, run, None, trip)
            .await
            .map_err(db_error)
    }

    async fn lock_parent(&mut self, id: &ActionId, parent: &str) -> Result<FoundParent, Error> {
        if let Some(found) = self.read.parents.get(&id.sibling(parent.to_owned())) {
            return Ok(found.clone());
        }
        self.apply_pending().await?;
        // FOR SHARE: an Abort of the parent waits for this insert to
        // commit, then its cascade sees the new child.
        let lock = " FOR SHARE OF a";
        sql::parent(&mut *self.conn, id, parent, lock, trip)
            .await
            .map_err(db_error)
    }

    async fn insert_action(&mut self, new: NewAction<'_>) -> Result<bool, Error> {
        let NewAction { action, queue } = new;
        if self.hold(&action.id).await? {
            let held = (action.clone(), queue.map(str::to_owned));
            self.pending().inserts.push(held);
            return Ok(true);
        }
        trip();
        let timeout_secs = action.condition_timeout.map(|t| t.as_secs_f64());
        let inserted = sqlx::query(concat!(
            "WITH changed AS (",
            " INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,",
            "   output_uri, condition_type, deadline, run_output_base)",
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now() + make_interval(secs => $13), $14)",
            " ON CONFLICT ON CONSTRAINT actions_pkey DO NOTHING",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!("$15")
        ))
        .bind_new_action(action, queue)
        .bind(timeout_secs)
        .bind(&action.run_output_base)
        .bind(action.by.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn lock_current(&mut self, id: &ActionId) -> Result<Option<Current>, Error> {
        if let Some(current) = self.read.current.get(id) {
            return Ok(current.clone());
        }
        self.apply_pending().await?;
        trip();
        let row = sql::current(&mut *self.conn, id, " FOR UPDATE")
            .await
            .map_err(db_error)?;
        row.map(CurrentRow::into_current).transpose()
    }

    async fn write_update(&mut self, update: &UpdateStatus, next: Transition) -> Result<(), Error> {
        if self.hold(&update.id).await? {
            self.pending().updates.push((update.clone(), next));
            return Ok(());
        }
        trip();
        sqlx::query(concat!(
            "WITH changed AS (",
            " UPDATE actions SET phase = $6, attempt = $7, version = version + 1, updated_at = now(),",
            "   start_time = COALESCE($8, start_time),",
            "   end_time = CASE WHEN $9 THEN COALESCE($10, end_time, now()) ELSE end_time END,",
            "   address = COALESCE($11, address)",
            " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!("$12")
        ))
        .bind_id(&update.id)
        .bind(next.phase)
        .bind(i64::from(next.attempt))
        .bind(update.start_time)
        .bind(next.phase.is_terminal())
        .bind(update.end_time)
        .bind(update.address.as_deref())
        .bind(update.by.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn abort_subtree(&mut self, abort: &AbortAction) -> Result<usize, Error> {
        // Walks the whole subtree (terminal actions keep their phase, but
        // their descendants are still aborted). Repeated until nothing
        // changes: a child inserted by a concurrent Enqueue that committed
        // while this statement waited for its lock is picked up by the
        // next round.
        let cascade = format!(
            concat!(
                "WITH RECURSIVE subtree(name) AS (",
                "  SELECT $5::text",
                "  UNION SELECT a.name FROM actions a JOIN subtree s ON a.parent_name = s.name",
                "  WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4",
                "), changed AS (",
                "  UPDATE actions a SET phase = $9, version = a.version + 1, updated_at = now(),",
                "    end_time = now(), abort_reason = $6, aborted_by = $7, error = $8",
                "  FROM subtree s",
                "  WHERE a.org = $1 AND a.project = $2 AND a.domain = $3 AND a.run_name = $4",
                "    AND a.name = s.name AND a.phase NOT IN {terminal}",
                "  RETURNING ",
                a_state_columns!(),
                ")",
                insert_events_from_changed!("$10")
            ),
            terminal = terminal_phases()
        );
        // The cascade reads and changes rows the batch may have read or
        // written.
        self.apply_pending().await?;
        self.read = Prefetched::default();
        let mut total = 0usize;
        loop {
            trip();
            let changed = sqlx::query(&cascade)
                .bind_id(&abort.id)
                .bind(&abort.reason)
                .bind(abort.aborted_by.as_deref())
                .bind(abort.error.as_ref())
                .bind(Phase::Aborted)
                .bind(abort.by.as_deref())
                .execute(&mut *self.conn)
                .await
                .map_err(db_error)?
                .rows_affected();
            if changed == 0 {
                break;
            }
            total += usize::try_from(changed).unwrap_or(usize::MAX);
        }
        Ok(total)
    }

    async fn write_signal(&mut self, signal: &SignalAction) -> Result<(), Error> {
        self.apply_pending().await?;
        self.forget(&signal.id);
        trip();
        sqlx::query(concat!(
            "WITH changed AS (",
            " UPDATE actions SET phase = $8, value = $6, signalled_by = $7, version = version + 1,",
            "   updated_at = now(), end_time = now()",
            " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!("$9")
        ))
        .bind_id(&signal.id)
        .bind(signal.value.literal.as_ref())
        .bind(signal.signalled_by.as_deref())
        .bind(Phase::Succeeded)
        .bind(signal.by.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn write_retry(&mut self, finish: &FinishAction) -> Result<(), Error> {
        self.apply_pending().await?;
        self.forget(&finish.id);
        trip();
        sqlx::query(concat!(
            "WITH changed AS (",
            " UPDATE actions SET phase = $7, attempt = attempt + 1, error = $6,",
            "   lease_holder = NULL, lease_deadline = NULL,",
            "   version = version + 1, updated_at = now()",
            " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!("$8")
        ))
        .bind_id(&finish.id)
        .bind(finish.error.as_deref())
        .bind(Phase::Queued)
        .bind(finish.by.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn write_finish(&mut self, finish: &FinishAction, output_uri: &str) -> Result<(), Error> {
        if self.hold(&finish.id).await? {
            self.pending()
                .finishes
                .push((finish.clone(), output_uri.to_owned()));
            return Ok(());
        }
        trip();
        sqlx::query(concat!(
            "WITH changed AS (",
            " UPDATE actions SET phase = $6, output_uri = $7, error = $8, lease_deadline = NULL,",
            "   end_time = now(), version = version + 1, updated_at = now()",
            " WHERE org = $1 AND project = $2 AND domain = $3 AND run_name = $4 AND name = $5",
            " RETURNING ",
            state_columns!(),
            ")",
            insert_events_from_changed!("$9")
        ))
        .bind_id(&finish.id)
        .bind(finish.phase)
        .bind(output_uri)
        .bind(finish.error.as_deref())
        .bind(finish.by.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}
