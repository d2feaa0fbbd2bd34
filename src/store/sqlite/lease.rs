//! The statements of SQLite claims and heartbeats ([`LeaseTx`]). The
//! transaction holds the write lock: claimers take turns, so candidates and
//! runs need no row locks.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::tx::SqliteTx;
use super::{db_error, micros, time_from_micros, trip};
use crate::domain::{ActionId, ClaimRequest, Error, Lease, Phase};
use crate::store::lease::LeaseTx;
use crate::store::rows::{terminal_phases, BindId, LeaseRow};

// The transaction holds the write lock: candidates and runs need no row
// locks.
shared_lease_tx_of_every_backend!(
    SqliteTx<'_>,
    sqlx::Sqlite,
    position: i64,
    candidate_lock: "",
    run_lock: ""
);

#[async_trait]
impl LeaseTx for SqliteTx<'_> {
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
