//! The statements of a SQLite write transaction ([`CommandTx`]).
//!
//! The transaction holds the database's write lock (`BEGIN IMMEDIATE`), so
//! no row locks are needed: nothing read can change until it ends.

use async_trait::async_trait;
use chrono::DateTime;
use sqlx::SqliteConnection;

use super::{db_error, trip};
use crate::domain::{
    AbortAction, ActionId, Current, Error, FinishAction, Phase, RunSettings, SignalAction,
    Transition, UpdateStatus,
};
use crate::store::apply::{CommandTx, FoundParent, NewAction, RunRoot, Stored};
use crate::store::rows::{terminal_phases, BindId, BindNewAction, CurrentRow};
use crate::store::sql;

/// A transaction's connection and its one time (as Postgres's `now()`), in
/// stored units (microseconds since the Unix epoch).
pub(super) struct SqliteTx<'c> {
    pub conn: &'c mut SqliteConnection,
    pub now: i64,
}

impl SqliteTx<'_> {
    /// Appends the state the change left to the event log: a copy of the
    /// action's row, with who made the change when known.
    pub(super) async fn append_event(
        &mut self,
        id: &ActionId,
        by: Option<&str>,
    ) -> Result<(), Error> {
        trip();
        sqlx::query(concat!(
            "INSERT INTO events (",
            state_columns!(),
            ", created_at, changed_by) SELECT ",
            state_columns!(),
            ", ?6, ?7 FROM actions",
            " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5"
        ))
        .bind_id(id)
        .bind(self.now)
        .bind(by)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl CommandTx for SqliteTx<'_> {
    async fn stored(&mut self, id: &ActionId) -> Result<Option<Stored>, Error> {
        trip();
        sql::stored(&mut *self.conn, id).await.map_err(db_error)
    }

    async fn insert_run(&mut self, id: &ActionId, run: &RunSettings) -> Result<RunRoot, Error> {
        sql::insert_run::<sqlx::Sqlite, _>(self.conn, id, run, Some(self.now), trip)
            .await
            .map_err(db_error)
    }

    async fn lock_parent(&mut self, id: &ActionId, parent: &str) -> Result<FoundParent, Error> {
        sql::parent(&mut *self.conn, id, parent, "", trip)
            .await
            .map_err(db_error)
    }

    async fn insert_action(&mut self, new: NewAction<'_>) -> Result<bool, Error> {
        let NewAction { action, queue } = new;
        trip();
        let now = self.now;
        let deadline = action.condition_timeout.map(|timeout| {
            now.saturating_add(i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX))
        });
        let inserted = sqlx::query(
            "INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, spec, queue,\
               output_uri, condition_type, deadline, created_at, updated_at, run_output_base) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15) \
             ON CONFLICT (org, project, domain, run_name, name) DO NOTHING",
        )
        .bind_new_action(action, queue)
        .bind(deadline)
        .bind(now)
        .bind(&action.run_output_base)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        self.append_event(&action.id, action.by.as_deref()).await?;
        Ok(true)
    }

    async fn lock_current(&mut self, id: &ActionId) -> Result<Option<Current>, Error> {
        trip();
        let row = sql::current(&mut *self.conn, id, "")
            .await
            .map_err(db_error)?;
        row.map(CurrentRow::into_current).transpose()
    }

    async fn write_update(&mut self, update: &UpdateStatus, next: Transition) -> Result<(), Error> {
        trip();
        sqlx::query(
            "UPDATE actions SET phase = ?6, attempt = ?7, version = version + 1, updated_at = ?11, \
               start_time = COALESCE(?8, start_time), \
               end_time = CASE WHEN ?9 THEN COALESCE(?10, end_time, ?11) ELSE end_time END, \
               address = COALESCE(?12, address) \
             WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        )
        .bind_id(&update.id)
        .bind(next.phase)
        .bind(i64::from(next.attempt))
        .bind(update.start_time.as_ref().map(DateTime::timestamp_micros))
        .bind(next.phase.is_terminal())
        .bind(update.end_time.as_ref().map(DateTime::timestamp_micros))
        .bind(self.now)
        .bind(update.address.as_deref())
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        self.append_event(&update.id, update.by.as_deref()).await
    }

    async fn abort_subtree(&mut self, abort: &AbortAction) -> Result<usize, Error> {
        // Walks the whole subtree (terminal actions keep their phase, but
        // their descendants are still aborted). One pass is enough: this
        // transaction holds the write lock, so no child can be enqueued
        // meanwhile.
        trip();
        let names: Vec<String> = sqlx::query_scalar(&format!(
            concat!(
                "WITH RECURSIVE subtree(name) AS (",
                "  SELECT ?5",
                "  UNION SELECT a.name FROM actions a JOIN subtree s ON a.parent_name = s.name",
                "  WHERE a.org = ?1 AND a.project = ?2 AND a.domain = ?3 AND a.run_name = ?4",
                ")",
                " UPDATE actions SET phase = ?10, version = version + 1, updated_at = ?9,",
                "   end_time = ?9, abort_reason = ?6, aborted_by = ?7, error = ?8",
                " WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4",
                "   AND name IN (SELECT name FROM subtree) AND phase NOT IN {terminal}",
                " RETURNING name"
            ),
            terminal = terminal_phases()
        ))
        .bind_id(&abort.id)
        .bind(&abort.reason)
        .bind(abort.aborted_by.as_deref())
        .bind(abort.error.as_ref())
        .bind(self.now)
        .bind(Phase::Aborted)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_error)?;
        for name in &names {
            self.append_event(&abort.id.sibling(name.clone()), abort.by.as_deref())
                .await?;
        }
        Ok(names.len())
    }

    async fn write_signal(&mut self, signal: &SignalAction) -> Result<(), Error> {
        trip();
        sqlx::query(
            "UPDATE actions SET phase = ?9, value = ?6, signalled_by = ?7, version = version + 1, \
               updated_at = ?8, end_time = ?8 \
             WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        )
        .bind_id(&signal.id)
        .bind(signal.value.literal.as_ref())
        .bind(signal.signalled_by.as_deref())
        .bind(self.now)
        .bind(Phase::Succeeded)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        self.append_event(&signal.id, signal.by.as_deref()).await
    }

    async fn write_retry(&mut self, finish: &FinishAction) -> Result<(), Error> {
        trip();
        sqlx::query(
            "UPDATE actions SET phase = ?8, attempt = attempt + 1, error = ?6, \
               lease_holder = NULL, lease_deadline = NULL, \
               version = version + 1, updated_at = ?7 \
             WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        )
        .bind_id(&finish.id)
        .bind(finish.error.as_deref())
        .bind(self.now)
        .bind(Phase::Queued)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        self.append_event(&finish.id, finish.by.as_deref()).await
    }

    async fn write_finish(&mut self, finish: &FinishAction, output_uri: &str) -> Result<(), Error> {
        trip();
        sqlx::query(
            "UPDATE actions SET phase = ?6, output_uri = ?7, error = ?8, lease_deadline = NULL, \
               end_time = ?9, version = version + 1, updated_at = ?9 \
             WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5",
        )
        .bind_id(&finish.id)
        .bind(finish.phase)
        .bind(output_uri)
        .bind(finish.error.as_deref())
        .bind(self.now)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        self.append_event(&finish.id, finish.by.as_deref()).await
    }

    async fn savepoint(&mut self, first: bool) -> Result<(), Error> {
        trip();
        let savepoint = if first {
            "SAVEPOINT command"
        } else {
            "RELEASE SAVEPOINT command; SAVEPOINT command"
        };
        sqlx::Executor::execute(&mut *self.conn, sqlx::raw_sql(savepoint))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<(), Error> {
        trip();
        sqlx::Executor::execute(
            &mut *self.conn,
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT command"),
        )
        .await
        .map_err(db_error)?;
        Ok(())
    }
}
