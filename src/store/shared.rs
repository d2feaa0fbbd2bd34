//! Trait impls whose code is the same on both backends, written once and
//! expanded for each backend's store or transaction type.
//!
//! The statements they run are generic over the database (`sql.rs`,
//! `read.rs`). The impls are macros rather than blanket impls over a
//! backend trait because two things in them are not generic: a listing
//! executes sqlx's `QueryBuilder`, whose arguments only a concrete backend
//! can show to outlive the execution (see `read.rs`), and the pool, the
//! per-call bound and the error mapping are each backend's own items. Each
//! macro names what it takes from the module it is expanded in.

/// The [`ReadStore`](crate::store::ReadStore) impl of `$store`. Takes from
/// the module: `db_error`, `Self::within` (the bound on one call),
/// `EMPTY_BLOB` (an empty blob literal, in place of a listing's specs) and
/// `bind_time` (a time as the backend binds it). `leases_of` is here too:
/// one statement of `sql.rs`.
macro_rules! read_store_of_every_backend {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::ReadStore for $store {
            #[tracing::instrument(skip_all, fields(run = %run))]
            async fn run_spec(
                &self,
                run: &$crate::domain::RunId,
            ) -> Result<bytes::Bytes, $crate::domain::Error> {
                self.within($crate::store::read::run_spec(&self.pool, run, db_error))
                    .await
            }

            #[tracing::instrument(skip_all, fields(action = %id))]
            async fn get_action(
                &self,
                id: &$crate::domain::ActionId,
            ) -> Result<$crate::domain::ActionRecord, $crate::domain::Error> {
                self.within($crate::store::read::action(&self.pool, id, db_error))
                    .await
            }

            #[tracing::instrument(skip_all)]
            async fn list_actions(
                &self,
                filter: &$crate::domain::ActionFilter,
                page: &$crate::domain::PageRequest<$crate::domain::ActionPosition>,
            ) -> Result<
                $crate::domain::Page<$crate::domain::ActionRecord, $crate::domain::ActionPosition>,
                $crate::domain::Error,
            > {
                use $crate::store::{listing, read};
                self.within(async move {
                    let columns = read::listing_columns(EMPTY_BLOB);
                    let mut query = listing::actions_page(&columns, filter, page, bind_time);
                    read::actions_page(query.build().fetch(&self.pool), page, db_error).await
                })
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn list_runs(
                &self,
                filter: &$crate::domain::RunFilter,
                page: &$crate::domain::PageRequest<$crate::domain::RunPosition>,
            ) -> Result<
                $crate::domain::Page<$crate::domain::RunRecord, $crate::domain::RunPosition>,
                $crate::domain::Error,
            > {
                use $crate::store::{listing, read};
                self.within(async move {
                    let mut query = listing::runs_page(filter, page, bind_time);
                    let rows = query.build_query_as().fetch_all(&self.pool).await;
                    Ok(read::runs_page(rows.map_err(db_error)?, page))
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(action = %parent))]
            async fn watch_snapshot(
                &self,
                parent: &$crate::domain::ActionId,
                after: Option<&$crate::domain::SnapshotPosition>,
                limit: usize,
            ) -> Result<
                $crate::domain::Page<$crate::domain::ActionState, $crate::domain::SnapshotPosition>,
                $crate::domain::Error,
            > {
                self.within($crate::store::read::snapshot(
                    &self.pool, parent, after, limit, bind_time, db_error,
                ))
                .await
            }

            #[tracing::instrument(skip_all, fields(action = %id))]
            async fn history(
                &self,
                id: &$crate::domain::ActionId,
            ) -> Result<Vec<$crate::domain::HistoryEntry>, $crate::domain::Error> {
                self.within($crate::store::read::history(&self.pool, id, db_error))
                    .await
            }

            #[tracing::instrument(skip_all, fields(executor = %executor))]
            async fn leases_of(
                &self,
                executor: &str,
            ) -> Result<Vec<$crate::domain::Lease>, $crate::domain::Error> {
                self.within(async {
                    $crate::store::sql::held_leases(&self.pool, executor)
                        .await
                        .map_err(db_error)?
                        .into_iter()
                        .map($crate::store::rows::LeaseRow::into_lease)
                        .collect()
                })
                .await
            }
        }
    };
}

/// The [`Housekeeping`](crate::store::Housekeeping) impl of `$store`:
/// the statements of `sql.rs` and of the backend's `retention` module.
/// Takes from the module: `db_error`, `retention` and `Self::within`.
macro_rules! housekeeping_of_every_backend {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Housekeeping for $store {
            async fn delete_finished_runs(
                &self,
                finished_before: chrono::DateTime<chrono::Utc>,
                limit: usize,
            ) -> Result<$crate::store::Deleted, $crate::domain::Error> {
                retention::delete_finished_runs(self, finished_before, limit).await
            }

            async fn delete_run(
                &self,
                run: &$crate::domain::RunId,
            ) -> Result<$crate::store::Deleted, $crate::domain::Error> {
                retention::delete_run(self, run).await
            }

            async fn record_feed_position(
                &self,
                daemon: &str,
                cursor: Option<$crate::store::FeedCursor>,
                ttl: std::time::Duration,
            ) -> Result<(), $crate::domain::Error> {
                retention::record_feed_position(self, daemon, cursor, ttl).await
            }

            async fn pending_purges(
                &self,
                limit: usize,
            ) -> Result<Vec<$crate::domain::RunId>, $crate::domain::Error> {
                self.within(async {
                    $crate::store::sql::pending_purges(&self.pool, limit)
                        .await
                        .map_err(db_error)
                })
                .await
            }

            async fn purged(
                &self,
                run: &$crate::domain::RunId,
            ) -> Result<(), $crate::domain::Error> {
                retention::purged(self, run).await
            }

            async fn queue_stats(
                &self,
                limit: usize,
            ) -> Result<$crate::store::QueueStats, $crate::domain::Error> {
                self.within(async {
                    $crate::store::sql::queue_stats(&self.pool, limit)
                        .await
                        .map_err(db_error)
                })
                .await
            }

            fn pool_stats(&self) -> $crate::store::PoolStats {
                $crate::store::PoolStats {
                    open: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                }
            }

            async fn ping(&self) -> Result<(), $crate::domain::Error> {
                self.within(async {
                    sqlx::query("SELECT 1")
                        .execute(&self.pool)
                        .await
                        .map_err(db_error)?;
                    Ok(())
                })
                .await
            }
        }
    };
}

/// The [`SharedLeaseTx`](crate::store::lease::SharedLeaseTx) impl of
/// transaction `$tx` on database `$db`: the statements of `sql.rs` on its
/// `conn`, with `created_at` as `$position`, and the row locks of
/// candidates and of a run whose leases are counted. Takes from the
/// module: `db_error` and `trip` (counts a statement).
macro_rules! shared_lease_tx_of_every_backend {
    (
        $tx:ty,
        $db:ty,
        position: $position:ty,
        candidate_lock: $lock:expr,
        run_lock: $run_lock:expr
    ) => {
        #[async_trait::async_trait]
        impl $crate::store::lease::SharedLeaseTx for $tx {
            type Position = ($position, $crate::domain::ActionId);

            async fn candidates(
                &mut self,
                queue: &str,
                after: Option<&Self::Position>,
                limit: usize,
            ) -> Result<Vec<$crate::store::lease::Candidate<Self::Position>>, $crate::domain::Error>
            {
                trip();
                $crate::store::sql::candidates(
                    &mut *self.conn,
                    queue,
                    after,
                    limit,
                    $lock,
                    db_error,
                )
                .await
            }

            async fn run_leases(
                &mut self,
                run: &$crate::domain::RunId,
            ) -> Result<i64, $crate::domain::Error> {
                $crate::store::sql::count_run_leases::<$db>(&mut *self.conn, run, $run_lock, trip)
                    .await
                    .map_err(db_error)
            }

            async fn held(
                &mut self,
                executor: &str,
                count_waiting: bool,
            ) -> Result<(i64, i64), $crate::domain::Error> {
                trip();
                $crate::store::sql::count_held(&mut *self.conn, executor, count_waiting)
                    .await
                    .map_err(db_error)
            }

            async fn release_ended(
                &mut self,
                executor: &str,
            ) -> Result<Vec<$crate::store::lease::Released>, $crate::domain::Error> {
                trip();
                $crate::store::sql::release(&mut *self.conn, executor)
                    .await
                    .map_err(db_error)?
                    .into_iter()
                    .map($crate::store::rows::ReleasedRow::into_released)
                    .collect()
            }
        }
    };
}
