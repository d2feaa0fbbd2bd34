//! The statements of a Postgres write transaction ([`CommandTx`]).

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{db_error, trip};
use crate::domain::{
    AbortAction, ActionId, Command, Current, EnqueueAction, Error, FinishAction, Phase, RunId,
    RunSettings, SignalAction, Transition, UpdateStatus,
};
use crate::store::apply::{CommandTx, Stored};
use crate::store::rows::{terminal_phases, BindId, CurrentRow, IdRow, ParentRow, StoredRow};
use crate::store::sql;

/// A transaction's connection, with what [`CommandTx::prefetch`] read for
/// its batch.
pub(super) struct PgTx<'c> {
    pub conn: &'c mut PgConnection,
    read: Prefetched,
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

/// Selects from `actions a` (joined with its run `r`) the rows of the keys
/// bound as `$1..$5` arrays.
macro_rules! of_keys {
    () => {
        " FROM actions a JOIN runs r \
            ON (r.org, r.project, r.domain, r.name) = (a.org, a.project, a.domain, a.run_name) \
          WHERE (a.org, a.project, a.domain, a.run_name, a.name) IN ( \
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])) \
          ORDER BY a.org, a.project, a.domain, a.run_name, a.name"
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
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.spec, r.run_spec,",
            " r.root_name = a.name AS is_root",
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
            let stored = Stored {
                spec: row.stored.spec,
                run_spec: row.stored.run_spec,
                is_root: row.stored.is_root,
            };
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
            "SELECT a.org, a.project, a.domain, a.run_name, a.name, a.phase, r.queue",
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
        Ok(())
    }

    fn savepoints(&self) -> bool {
        false
    }

    async fn stored(&mut self, id: &ActionId) -> Result<Option<Stored>, Error> {
        if let Some(stored) = self.read.stored.get(id) {
            return Ok(stored.clone());
        }
        trip();
        let row: Option<StoredRow> = sqlx::query_as(sql::STORED)
            .bind_id(id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_error)?;
        Ok(row.map(|row| Stored {
            spec: row.spec,
            run_spec: row.run_spec,
            is_root: row.is_root,
        }))
    }

    async fn insert_run(&mut self, id: &ActionId, run: &RunSettings) -> Result<bool, Error> {
        trip();
        let inserted = sqlx::query(
            "INSERT INTO runs (org, project, domain, name, root_name, run_spec, queue, max_action_concurrency) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT ON CONSTRAINT runs_pkey DO NOTHING",
        )
        .bind_id(id)
        .bind(run.run_spec.as_ref())
        .bind(&run.queue)
        .bind(i32::try_from(run.max_action_concurrency).unwrap_or(i32::MAX))
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn run_root(&mut self, run: &RunId) -> Result<String, Error> {
        trip();
        sql::run_root(&mut *self.conn, run).await.map_err(db_error)
    }

    async fn lock_parent(
        &mut self,
        id: &ActionId,
        parent: &str,
    ) -> Result<Option<(Phase, Option<String>)>, Error> {
        if let Some(found) = self.read.parents.get(&id.sibling(parent.to_owned())) {
            return Ok(found.clone());
        }
        trip();
        // FOR SHARE: an Abort of the parent waits for this insert to
        // commit, then its cascade sees the new child.
        let row = sql::parent(&mut *self.conn, id, parent, " FOR SHARE OF a")
            .await
            .map_err(db_error)?;
        Ok(row.map(|row| (row.phase, row.queue)))
    }

    async fn insert_action(
        &mut self,
        action: &EnqueueAction,
        queue: Option<&str>,
    ) -> Result<bool, Error> {
        self.forget(&action.id);
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
        .bind_id(&action.id)
        .bind(&action.parent)
        .bind(action.kind)
        .bind(action.phase)
        .bind(action.spec.as_ref())
        .bind(queue)
        .bind(&action.output_uri)
        .bind(action.condition_type)
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
        trip();
        let row: Option<CurrentRow> = sqlx::query_as(&format!("{} FOR UPDATE", sql::CURRENT))
            .bind_id(id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_error)?;
        row.map(CurrentRow::into_current).transpose()
    }

    async fn write_update(&mut self, update: &UpdateStatus, next: Transition) -> Result<(), Error> {
        self.forget(&update.id);
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
                "  RETURNING a.org, a.project, a.domain, a.run_name, a.name, a.parent_name, a.version,",
                "    a.phase, a.attempt, a.output_uri, a.error, a.value, a.queue, a.lease_holder,",
                "    a.kind, a.run_output_base, a.address",
                ")",
                insert_events_from_changed!("$10")
            ),
            terminal = terminal_phases()
        );
        // The cascade changes rows the batch may have read.
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
