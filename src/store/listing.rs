//! The read API's listing queries, built once for both stores.
//!
//! Listings are keyset-paginated on the columns they are ordered by, so a
//! page costs the same wherever it is and concurrent inserts never shift
//! what a page token points at. The SQL is the same in both dialects; what
//! differs is how a time is bound (`timestamptz` in Postgres, microseconds
//! in SQLite), which each store passes in as `time`.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::domain::{
    ActionFilter, ActionKind, ActionPosition, PageRequest, RunFilter, RunId, RunPosition, RunRecord,
};
use crate::store::rows::RunPhaseRow;

/// One more row than the page holds: its presence says a next page exists.
fn overfetch(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1
}

/// Appends `AND <run columns> = <run>`; `prefix` qualifies the columns.
pub(super) fn push_run<'a, DB>(query: &mut QueryBuilder<'a, DB>, prefix: &str, run: &RunId)
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
{
    for (column, value) in [
        ("org", &run.org),
        ("project", &run.project),
        ("domain", &run.domain),
        ("run_name", &run.name),
    ] {
        query
            .push(format_args!(" AND {prefix}{column} = "))
            .push_bind(value.clone());
    }
}

/// `SELECT <columns> FROM actions` matching `filter`, after `page.after`,
/// in listing order, one row more than the page.
pub(super) fn actions_page<'a, DB, T>(
    columns: &str,
    filter: &ActionFilter,
    page: &PageRequest<ActionPosition>,
    time: fn(DateTime<Utc>) -> T,
) -> QueryBuilder<'a, DB>
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    i16: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    T: Encode<'a, DB> + Type<DB> + 'a,
{
    let mut query = QueryBuilder::new(format!("SELECT {columns} FROM actions WHERE true"));
    if let Some(run) = &filter.run {
        push_run(&mut query, "", run);
    }
    if let Some(parent) = &filter.parent {
        query.push(" AND parent_name = ").push_bind(parent.clone());
    }
    if !filter.phases.is_empty() {
        query.push(" AND phase IN (");
        let mut list = query.separated(", ");
        for phase in &filter.phases {
            list.push_bind(*phase as i16);
        }
        query.push(")");
    }
    if let Some(queue) = &filter.queue {
        query
            .push(format_args!(
                " AND kind = {} AND queue = ",
                ActionKind::Task as i16
            ))
            .push_bind(queue.clone());
    }
    if let Some(after) = &page.after {
        let run = &after.id.run;
        query
            .push(" AND (created_at, org, project, domain, run_name, name) > (")
            .push_bind(time(after.created_at));
        for value in [
            &run.org,
            &run.project,
            &run.domain,
            &run.name,
            &after.id.name,
        ] {
            query.push(", ").push_bind(value.clone());
        }
        query.push(")");
    }
    query
        .push(" ORDER BY created_at, org, project, domain, run_name, name LIMIT ")
        .push_bind(overfetch(page.limit));
    query
}

/// A page of runs matching `filter`, newest first, after `page.after`
/// (one run more than the page), joined with one row per (run, phase) of
/// its actions: `org, project, domain, run_name, root_name, queue,
/// created_at, root_phase, phase, actions`, in listing order, then phase.
/// One statement, so the counts and the runs agree.
pub(super) fn runs_page<'a, DB, T>(
    filter: &RunFilter,
    page: &PageRequest<RunPosition>,
    time: fn(DateTime<Utc>) -> T,
) -> QueryBuilder<'a, DB>
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    i16: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    T: Encode<'a, DB> + Type<DB> + 'a,
{
    let mut query = QueryBuilder::new(
        // The queue shown is the root's own (TaskAction.queue, else the
        // RunSpec's, else "default"); the RunSpec's for a root that is not
        // a task.
        "WITH page AS (SELECT r.org, r.project, r.domain, r.name, r.root_name, \
         COALESCE(root.queue, r.queue) AS queue, r.created_at, root.phase AS root_phase FROM runs r \
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
        let run = &after.id;
        query
            .push(" AND (r.created_at, r.org, r.project, r.domain, r.name) < (")
            .push_bind(time(after.created_at));
        for value in [&run.org, &run.project, &run.domain, &run.name] {
            query.push(", ").push_bind(value.clone());
        }
        query.push(")");
    }
    query
        .push(
            " ORDER BY r.created_at DESC, r.org DESC, r.project DESC, r.domain DESC, \
             r.name DESC LIMIT ",
        )
        .push_bind(overfetch(page.limit))
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
    query
}

/// Folds the rows of [`runs_page`] into runs, keeping their order.
pub(super) fn group_runs(rows: Vec<RunPhaseRow>) -> Vec<RunRecord> {
    let mut runs: Vec<RunRecord> = Vec::new();
    for row in rows {
        let count = (row.phase, u32::try_from(row.actions).unwrap_or(u32::MAX));
        let id = RunId {
            org: row.org,
            project: row.project,
            domain: row.domain,
            name: row.run_name,
        };
        match runs.last_mut() {
            Some(run) if run.id == id => run.counts.push(count),
            _ => runs.push(RunRecord {
                id,
                root_name: row.root_name,
                phase: row.root_phase,
                counts: vec![count],
                queue: row.queue,
                created_at: row.created_at.0,
            }),
        }
    }
    runs
}
