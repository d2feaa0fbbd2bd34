//! The statements of Postgres claims and heartbeats ([`LeaseTx`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::tx::PgTx;
use super::{db_error, trip};
use crate::domain::{ActionId, ClaimRequest, Error, Lease, Phase};
use crate::store::lease::{in_order_of, LeaseTx};
use crate::store::rows::{terminal_phases, LeaseRow, StoredTime};

shared_lease_tx_of_every_backend!(
    PgTx<'_>,
    sqlx::Postgres,
    position: StoredTime,
    candidate_lock: " FOR UPDATE OF a SKIP LOCKED",
    run_lock: " FOR UPDATE"
);

#[async_trait]
impl LeaseTx for PgTx<'_> {
    async fn lease(
        &mut self,
        ids: &[ActionId],
        request: &ClaimRequest,
    ) -> Result<Vec<Lease>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        trip();
        let column = |get: fn(&ActionId) -> &str| ids.iter().map(get).collect::<Vec<&str>>();
        let rows: Vec<LeaseRow> = sqlx::query_as(concat!(
            "WITH chosen AS (",
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])",
            "   AS c(org, project, domain, run_name, name)",
            "), changed AS (",
            " UPDATE actions a SET phase = $8, lease_holder = $6,",
            "   lease_deadline = now() + make_interval(secs => $7),",
            "   version = a.version + 1, updated_at = now()",
            " FROM chosen c",
            " WHERE (a.org, a.project, a.domain, a.run_name, a.name)",
            "   = (c.org, c.project, c.domain, c.run_name, c.name)",
            " RETURNING a.*",
            "), logged AS (",
            insert_events_from_changed!(),
            ")",
            " SELECT c.org, c.project, c.domain, c.run_name, c.name, c.spec, c.attempt,",
            "   c.lease_deadline, c.run_output_base, r.run_spec",
            " FROM changed c JOIN runs r",
            "   ON (r.org, r.project, r.domain, r.name) = (c.org, c.project, c.domain, c.run_name)"
        ))
        .bind(column(|id| &id.run.org))
        .bind(column(|id| &id.run.project))
        .bind(column(|id| &id.run.domain))
        .bind(column(|id| &id.run.name))
        .bind(column(|id| &id.name))
        .bind(&request.executor)
        .bind(request.lease_ttl.as_secs_f64())
        .bind(Phase::Initializing)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_error)?;
        let leases = rows
            .into_iter()
            .map(LeaseRow::into_lease)
            .collect::<Result<Vec<_>, _>>()?;
        in_order_of(ids, leases)
    }

    async fn extend(&mut self, executor: &str, ttl: Duration) -> Result<DateTime<Utc>, Error> {
        trip();
        sqlx::query_scalar(&format!(
            "WITH extended AS (UPDATE actions SET lease_deadline = now() + make_interval(secs => $2) \
               WHERE lease_holder = $1 AND lease_deadline IS NOT NULL AND phase NOT IN {}) \
             SELECT now() + make_interval(secs => $2)",
            terminal_phases()
        ))
        .bind(executor)
        .bind(ttl.as_secs_f64())
        .fetch_one(&mut *self.conn)
        .await
        .map_err(db_error)
    }
}
