//! The read API over Postgres: the statements of `store::read`, each
//! bounded by the store's statement timeout.

use async_trait::async_trait;
use bytes::Bytes;
use tracing::instrument;

use super::{bounded, db_error, PgStore};
use crate::domain::{
    ActionFilter, ActionId, ActionPosition, ActionRecord, Error, HistoryEntry, Page, PageRequest,
    RunFilter, RunId, RunPosition, RunRecord,
};
use crate::store::{listing, read, ReadStore};

#[async_trait]
impl ReadStore for PgStore {
    #[instrument(skip_all, fields(run = %run))]
    async fn run_spec(&self, run: &RunId) -> Result<Bytes, Error> {
        bounded(self.timeout, read::run_spec(&self.pool, run, db_error)).await
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn get_action(&self, id: &ActionId) -> Result<ActionRecord, Error> {
        bounded(self.timeout, read::action(&self.pool, id, db_error)).await
    }

    #[instrument(skip_all)]
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: &PageRequest<ActionPosition>,
    ) -> Result<Page<ActionRecord, ActionPosition>, Error> {
        bounded(self.timeout, async move {
            let columns = read::listing_columns("''::bytea");
            let mut query = listing::actions_page(&columns, filter, page, |t| t);
            read::actions_page(query.build().fetch(&self.pool), page, db_error).await
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
            let rows = query.build_query_as().fetch_all(&self.pool).await;
            Ok(read::runs_page(rows.map_err(db_error)?, page))
        })
        .await
    }

    #[instrument(skip_all, fields(action = %id))]
    async fn history(&self, id: &ActionId) -> Result<Vec<HistoryEntry>, Error> {
        bounded(self.timeout, read::history(&self.pool, id, db_error)).await
    }
}
