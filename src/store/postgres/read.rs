//! The read API over Postgres; the listing queries are shared with the
//! SQLite store (`store::listing`).

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{QueryBuilder, Row};
use tracing::instrument;

use super::{bounded, db_error, state_from_row, time, PgStore};
use crate::domain::{
    ActionFilter, ActionId, ActionKind, ActionPosition, ActionRecord, Error, HistoryEntry, Page,
    PageRequest, RunFilter, RunId, RunPosition, RunRecord, PAGE_BUDGET,
};
use crate::store::listing::{self, group_runs, RunPhaseRow};
use crate::store::{read_bounded, ReadStore};

/// Everything an [`ActionRecord`] is read from.
macro_rules! record_columns {
    () => {
        concat!(
            state_columns!(),
            ", spec, lease_deadline, abort_reason, aborted_by, signalled_by,",
            " created_at, updated_at,",
            " start_time, end_time, deadline"
        )
    };
}

/// What a listing reads: a record without its spec, which listings do not
/// return (a spec may be megabytes).
macro_rules! listing_columns {
    () => {
        concat!(
            state_columns!(),
            ", ''::bytea AS spec, lease_deadline, abort_reason, aborted_by, signalled_by,",
            " created_at, updated_at,",
            " start_time, end_time, deadline"
        )
    };
}

fn record_from_row(row: &PgRow) -> Result<ActionRecord, Error> {
    let kind: i16 = row.try_get("kind").map_err(db_error)?;
    Ok(ActionRecord {
        state: state_from_row(row)?,
        kind: ActionKind::from_db(kind)
            .ok_or_else(|| Error::Internal(format!("unknown action kind {kind} in the store")))?,
        spec: Bytes::from(row.try_get::<Vec<u8>, _>("spec").map_err(db_error)?),
        lease_deadline: time::get_opt(row, "lease_deadline")?,
        abort_reason: row.try_get("abort_reason").map_err(db_error)?,
        aborted_by: row
            .try_get::<Option<Vec<u8>>, _>("aborted_by")
            .map_err(db_error)?
            .map(Bytes::from),
        signalled_by: row
            .try_get::<Option<Vec<u8>>, _>("signalled_by")
            .map_err(db_error)?
            .map(Bytes::from),
        created_at: time::get(row, "created_at")?,
        updated_at: time::get(row, "updated_at")?,
        start_time: time::get_opt(row, "start_time")?,
        end_time: time::get_opt(row, "end_time")?,
        deadline: time::get_opt(row, "deadline")?,
    })
}

#[async_trait]
impl ReadStore for PgStore {
    #[instrument(skip_all, fields(run = %run))]
    async fn run_spec(&self, run: &RunId) -> Result<Bytes, Error> {
        let row = sqlx::query(
            "SELECT run_spec FROM runs WHERE org = $1 AND project = $2 AND domain = $3 AND name = $4",
        )
        .bind(&run.org)
        .bind(&run.project)
        .bind(&run.domain)
        .bind(&run.name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::RunNotFound(run.clone()))?;
        Ok(Bytes::from(
            row.try_get::<Vec<u8>, _>("run_spec").map_err(db_error)?,
        ))
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error> {
        bounded(self.timeout, async move {
            let mut query = QueryBuilder::new(concat!(
                "SELECT ",
                record_columns!(),
                " FROM actions WHERE true"
            ));
            listing::push_run(&mut query, "", &id.run);
            query.push(" AND name = ").push_bind(id.name.clone());
            let row = query
                .build()
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?
                .ok_or_else(|| Error::ActionNotFound(id.clone()))?;
            record_from_row(&row)
        })
        .await
    }

    #[instrument(skip_all)]
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error> {
        bounded(self.timeout, async move {
            let mut query = listing::actions_page(listing_columns!(), filter, page, |t| t);
            let records = read_bounded(
                query.build().fetch(&self.pool),
                record_from_row,
                ActionRecord::approximate_size,
                page.limit,
                db_error,
            )
            .await?;
            Ok(Page::from_overfetch_within(
                records,
                page.limit,
                ActionRecord::position,
                ActionRecord::approximate_size,
                PAGE_BUDGET,
            ))
        })
        .await
    }

    #[instrument(skip_all)]
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest<RunPosition>,
    ) -> Result<Page<RunRecord, RunPosition>, Error> {
        bounded(self.timeout, async move {
            let mut query = listing::runs_page(filter, page, |t| t);
            let rows = query
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            let rows = rows
                .iter()
                .map(|row| {
                    Ok(RunPhaseRow {
                        id: RunId {
                            org: row.try_get("org").map_err(db_error)?,
                            project: row.try_get("project").map_err(db_error)?,
                            domain: row.try_get("domain").map_err(db_error)?,
                            name: row.try_get("run_name").map_err(db_error)?,
                        },
                        root_name: row.try_get("root_name").map_err(db_error)?,
                        root_phase: row.try_get("root_phase").map_err(db_error)?,
                        queue: row.try_get("queue").map_err(db_error)?,
                        created_at: time::get(row, "created_at")?,
                        phase: row.try_get("phase").map_err(db_error)?,
                        actions: row.try_get("actions").map_err(db_error)?,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let runs = group_runs(rows);
            Ok(Page::from_overfetch(runs, page.limit, RunRecord::position))
        })
        .await
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error> {
        bounded(self.timeout, async move {
            let mut query = QueryBuilder::new(concat!(
                "SELECT ",
                state_columns!(),
                ", created_at, changed_by FROM events WHERE true"
            ));
            listing::push_run(&mut query, "", &id.run);
            query
                .push(" AND name = ")
                .push_bind(id.name.clone())
                .push(" ORDER BY version");
            let rows = query
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            // Every action has at least the event of its enqueue.
            if rows.is_empty() {
                return Err(Error::ActionNotFound(id.clone()));
            }
            rows.iter()
                .map(|row| {
                    Ok(HistoryEntry {
                        state: state_from_row(row)?,
                        at: time::get(row, "created_at")?,
                        by: row.try_get("changed_by").map_err(db_error)?,
                    })
                })
                .collect()
        })
        .await
    }
}
