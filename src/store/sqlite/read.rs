//! The read API over SQLite: the statements of `store::read`, with times
//! bound as the stored microseconds.

use async_trait::async_trait;
use bytes::Bytes;
use tracing::instrument;

use super::{db_error, SqliteStore};
use crate::domain::{
    ActionFilter, ActionId, ActionPosition, ActionRecord, Error, HistoryEntry, Page, PageRequest,
    RunFilter, RunId, RunPosition, RunRecord,
};
use crate::store::{listing, read, ReadStore};

/// A time as SQLite stores it.
fn micros(time: chrono::DateTime<chrono::Utc>) -> i64 {
    time.timestamp_micros()
}

#[async_trait]
impl ReadStore for SqliteStore {
    #[instrument(skip_all, fields(run = %run))]
    async fn run_spec(&self, run: &RunId) -> Result<Bytes, Error> {
        read::run_spec(&self.pool, run, db_error).await
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error> {
        read::action(&self.pool, id, db_error).await
    }

    #[instrument(skip_all)]
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error> {
        let columns = read::listing_columns("X''");
        let mut query = listing::actions_page(&columns, filter, page, micros);
        read::actions_page(query.build().fetch(&self.pool), page, db_error).await
    }

    #[instrument(skip_all)]
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest<RunPosition>,
    ) -> Result<Page<RunRecord, RunPosition>, Error> {
        let mut query = listing::runs_page(filter, page, micros);
        let rows = query.build_query_as().fetch_all(&self.pool).await;
        Ok(read::runs_page(rows.map_err(db_error)?, page))
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error> {
        read::history(&self.pool, id, db_error).await
    }
}
