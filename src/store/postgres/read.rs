//! The read API over Postgres. Listings are keyset-paginated on the
//! columns they are ordered by, so a page costs the same wherever it is
//! and concurrent inserts never shift what a page token points at.

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use tracing::instrument;

use super::{db_error, phase_from_db, state_from_row, PgStore};
use crate::domain::{
    ActionFilter, ActionId, ActionKind, ActionPosition, ActionRecord, Error, HistoryEntry, Page,
    PageRequest, RunFilter, RunId, RunPosition, RunRecord,
};
use crate::store::ReadStore;

/// Everything an [`ActionRecord`] is read from.
macro_rules! record_columns {
    () => {
        concat!(
            state_columns!(),
            ", kind, spec, lease_deadline, abort_reason, created_at, updated_at,",
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
        lease_deadline: row.try_get("lease_deadline").map_err(db_error)?,
        abort_reason: row.try_get("abort_reason").map_err(db_error)?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        updated_at: row.try_get("updated_at").map_err(db_error)?,
        start_time: row.try_get("start_time").map_err(db_error)?,
        end_time: row.try_get("end_time").map_err(db_error)?,
        deadline: row.try_get("deadline").map_err(db_error)?,
    })
}

fn push_run(query: &mut QueryBuilder<'_, Postgres>, run: &RunId) {
    query.push(" AND org = ").push_bind(run.org.clone());
    query.push(" AND project = ").push_bind(run.project.clone());
    query.push(" AND domain = ").push_bind(run.domain.clone());
    query.push(" AND run_name = ").push_bind(run.name.clone());
}

#[async_trait]
impl ReadStore for PgStore {
    #[instrument(skip_all, fields(action = %id))]
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error> {
        let mut query = QueryBuilder::new(concat!(
            "SELECT ",
            record_columns!(),
            " FROM actions WHERE true"
        ));
        push_run(&mut query, &id.run);
        query.push(" AND name = ").push_bind(id.name.clone());
        let row = query
            .build()
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::ActionNotFound(id.clone()))?;
        record_from_row(&row)
    }

    #[instrument(skip_all)]
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error> {
        let mut query = QueryBuilder::new(concat!(
            "SELECT ",
            record_columns!(),
            " FROM actions WHERE true"
        ));
        if let Some(run) = &filter.run {
            push_run(&mut query, run);
        }
        if let Some(parent) = &filter.parent {
            query.push(" AND parent_name = ").push_bind(parent.clone());
        }
        if !filter.phases.is_empty() {
            let phases: Vec<i16> = filter.phases.iter().map(|p| *p as i16).collect();
            query.push(" AND phase = ANY(").push_bind(phases).push(")");
        }
        if let Some(queue) = &filter.queue {
            query
                .push(" AND kind = 1 AND queue = ")
                .push_bind(queue.clone());
        }
        if let Some(after) = &page.after {
            let run = &after.id.run;
            query
                .push(" AND (created_at, org, project, domain, run_name, name) > (")
                .push_bind(after.created_at)
                .push(", ")
                .push_bind(run.org.clone())
                .push(", ")
                .push_bind(run.project.clone())
                .push(", ")
                .push_bind(run.domain.clone())
                .push(", ")
                .push_bind(run.name.clone())
                .push(", ")
                .push_bind(after.id.name.clone())
                .push(")");
        }
        query
            .push(" ORDER BY created_at, org, project, domain, run_name, name LIMIT ")
            .push_bind(i64::try_from(page.limit).unwrap_or(i64::MAX - 1) + 1);
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let records = rows
            .iter()
            .map(record_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(
            records,
            page.limit,
            ActionRecord::position,
        ))
    }

    #[instrument(skip_all, fields(run = %run))]
    async fn run_actions(&self, run: &RunId) -> Result<Vec<ActionRecord>, Error> {
        let mut query = QueryBuilder::new(concat!(
            "SELECT ",
            record_columns!(),
            " FROM actions WHERE true"
        ));
        push_run(&mut query, run);
        query.push(" ORDER BY created_at, name");
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        if rows.is_empty() {
            return Err(Error::RunNotFound(run.clone()));
        }
        rows.iter().map(record_from_row).collect()
    }

    #[instrument(skip_all)]
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest<RunPosition>,
    ) -> Result<Page<RunRecord, RunPosition>, Error> {
        // The page of runs first, then one row per (run, phase) of its
        // actions: one statement, so counts and runs agree.
        let mut query = QueryBuilder::new(
            "WITH page AS (SELECT r.org, r.project, r.domain, r.name, r.root_name, r.queue, \
             r.created_at, root.phase AS root_phase FROM runs r \
             JOIN actions root ON root.org = r.org AND root.project = r.project \
             AND root.domain = r.domain AND root.run_name = r.name AND root.name = r.root_name \
             WHERE true",
        );
        for (column, value) in [
            ("org", &filter.org),
            ("project", &filter.project),
            ("domain", &filter.domain),
        ] {
            if let Some(value) = value {
                query
                    .push(format_args!(" AND r.{column} = "))
                    .push_bind(value.clone());
            }
        }
        if let Some(after) = &page.after {
            query
                .push(" AND (r.created_at, r.org, r.project, r.domain, r.name) < (")
                .push_bind(after.created_at)
                .push(", ")
                .push_bind(after.id.org.clone())
                .push(", ")
                .push_bind(after.id.project.clone())
                .push(", ")
                .push_bind(after.id.domain.clone())
                .push(", ")
                .push_bind(after.id.name.clone())
                .push(")");
        }
        query
            .push(
                " ORDER BY r.created_at DESC, r.org DESC, r.project DESC, r.domain DESC, \
                 r.name DESC LIMIT ",
            )
            .push_bind(i64::try_from(page.limit).unwrap_or(i64::MAX - 1) + 1)
            .push(
                ") SELECT p.org, p.project, p.domain, p.name AS run_name, p.root_name, p.queue, \
                 p.created_at, p.root_phase, a.phase, count(*) AS actions FROM page p \
                 JOIN actions a ON a.org = p.org AND a.project = p.project \
                 AND a.domain = p.domain AND a.run_name = p.name \
                 GROUP BY p.org, p.project, p.domain, p.name, p.root_name, p.queue, \
                 p.created_at, p.root_phase, a.phase \
                 ORDER BY p.created_at DESC, p.org DESC, p.project DESC, p.domain DESC, \
                 p.name DESC, a.phase",
            );
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut runs: Vec<RunRecord> = Vec::new();
        for row in &rows {
            let id = RunId {
                org: row.try_get("org").map_err(db_error)?,
                project: row.try_get("project").map_err(db_error)?,
                domain: row.try_get("domain").map_err(db_error)?,
                name: row.try_get("run_name").map_err(db_error)?,
            };
            let phase = phase_from_db(row.try_get("phase").map_err(db_error)?)?;
            let count = u32::try_from(row.try_get::<i64, _>("actions").map_err(db_error)?)
                .unwrap_or(u32::MAX);
            match runs.last_mut() {
                Some(run) if run.id == id => run.counts.push((phase, count)),
                _ => runs.push(RunRecord {
                    id,
                    root_name: row.try_get("root_name").map_err(db_error)?,
                    phase: phase_from_db(row.try_get("root_phase").map_err(db_error)?)?,
                    counts: vec![(phase, count)],
                    queue: row.try_get("queue").map_err(db_error)?,
                    created_at: row.try_get("created_at").map_err(db_error)?,
                }),
            }
        }
        Ok(Page::from_overfetch(runs, page.limit, RunRecord::position))
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error> {
        let mut query = QueryBuilder::new(concat!(
            "SELECT ",
            state_columns!(),
            ", created_at FROM events WHERE true"
        ));
        push_run(&mut query, &id.run);
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
                    at: row.try_get("created_at").map_err(db_error)?,
                })
            })
            .collect()
    }
}
