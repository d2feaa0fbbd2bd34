//! The statements of SQLite claims and heartbeats ([`LeaseTx`]). The
//! transaction holds the write lock: claimers take turns, so candidates and
//! runs need no row locks.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::tx::SqliteTx;
use super::{db_error, micros, time_from_micros, trip};
use crate::domain::{ActionId, ClaimRequest, Error, Lease, Phase, RunId};
use crate::store::lease::{Candidate, LeaseTx, Released};
use crate::store::rows::{terminal_phases, BindId, LeaseRow, ReleasedRow};
use crate::store::sql;

#[async_trait]
impl LeaseTx for SqliteTx<'_> {
    type Position = (i64, ActionId);

    async fn held(&mut self, executor: &str, count_waiting: bool) -> Result<(i64, i64), Error> {
        trip();
        sql::count_held(&mut *self.conn, executor, count_waiting)
            .await
            .map_err(db_error)
    }

    async fn candidates(
        &mut self,
        queue: &str,
        after: Option<&Self::Position>,
        limit: usize,
    ) -> Result<Vec<Candidate<Self::Position>>, Error> {
        trip();
        sql::candidates(
            &mut *self.conn,
            queue,
            after,
            limit,
            "",
            |row| row.try_get("created_at").map_err(db_error),
            db_error,
        )
        .await
    }

    async fn run_leases(&mut self, run: &RunId) -> Result<i64, Error> {
        trip();
        sql::count_run_leases(&mut *self.conn, run)
            .await
            .map_err(db_error)
    }

    async fn lease(
        &mut self,
        ids: &[ActionId],
        request: &ClaimRequest,
    ) -> Result<Vec<Lease>, Error> {
        let deadline = self.now.saturating_add(micros(request.lease_ttl));
        let mut leases = Vec::with_capacity(ids.len());
        for id in ids {
            trip();
            let row: LeaseRow = sqlx::query_as(
                "UPDATE actions SET phase = ?9, lease_holder = ?6, lease_deadline = ?7, \
                   version = version + 1, updated_at = ?8 \
                 WHERE org = ?1 AND project = ?2 AND domain = ?3 AND run_name = ?4 AND name = ?5 \
                 RETURNING org, project, domain, run_name, name, spec, attempt, lease_deadline, \
                   run_output_base, \
                   (SELECT run_spec FROM runs r WHERE r.org = actions.org \
                      AND r.project = actions.project AND r.domain = actions.domain \
                      AND r.name = actions.run_name) AS run_spec",
            )
            .bind_id(id)
            .bind(&request.executor)
            .bind(deadline)
            .bind(self.now)
            .bind(Phase::Initializing)
            .fetch_one(&mut *self.conn)
            .await
            .map_err(db_error)?;
            leases.push(row.into_lease()?);
            self.append_event(id, None).await?;
        }
        Ok(leases)
    }

    async fn release_ended(&mut self, executor: &str) -> Result<Vec<Released>, Error> {
        trip();
        sql::release(&mut *self.conn, executor)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(ReleasedRow::into_released)
            .collect()
    }

    async fn extend(&mut self, executor: &str, ttl: Duration) -> Result<DateTime<Utc>, Error> {
        trip();
        let deadline = self.now.saturating_add(micros(ttl));
        sqlx::query(&format!(
            "UPDATE actions SET lease_deadline = ?2 \
             WHERE lease_holder = ?1 AND lease_deadline IS NOT NULL AND phase NOT IN {}",
            terminal_phases()
        ))
        .bind(executor)
        .bind(deadline)
        .execute(&mut *self.conn)
        .await
        .map_err(db_error)?;
        time_from_micros(deadline)
    }
}
