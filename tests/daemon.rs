//! Daemon-level guarantees: replicas on one database, crash and restart,
//! a lost LISTEN connection, a database outage, and migrations.

mod common;

conformance!(restart_loses_no_acknowledged_enqueue,);

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actionsd::store::postgres::{PgStore, PoolSettings, MIGRATOR};
use actionsd::store::Store;
use common::*;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tonic::Code;

/// Polls `check` every 50 ms for at most `TIMEOUT`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = "migrations/postgres")]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn two_daemons_deliver_each_others_changes(pool: PgPool) {
    let a = Daemon::start(&TestDb::postgres(pool.clone())).await;
    let b = Daemon::start(&TestDb::postgres(pool.clone())).await;
    let mut via_a = a.client().await;
    let mut via_b = b.client().await;

    via_a.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut on_b = Watcher::open(&mut via_b, "r1", "a0").await;
    let mut on_a = Watcher::open(&mut via_a, "r1", "a0").await;

    via_a.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    via_a
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    on_b.until_phase("a1", RUNNING).await;
    via_b
        .update(status_update("r1", "a1", 1, SUCCEEDED))
        .await
        .unwrap();
    on_a.until_phase("a1", SUCCEEDED).await;
    on_b.until_phase("a1", SUCCEEDED).await;

    a.stop().await;
    b.stop().await;
}

async fn restart_loses_no_acknowledged_enqueue(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let client = daemon.client().await;
    client
        .clone()
        .enqueue(task("r1", "a0", None))
        .await
        .unwrap();

    let acked = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut client = client.clone();
        let acked = acked.clone();
        calls.spawn(async move {
            let name = format!("c{i}");
            let result = client.enqueue(task("r1", &name, Some("a0"))).await;
            if result.is_ok() {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            result.map(|_| name)
        });
    }
    // Crash while enqueues are in flight: after some were acknowledged,
    // before all were.
    eventually("the first acknowledgements", || {
        let acked = acked.clone();
        async move { acked.load(Ordering::SeqCst) >= 20 }
    })
    .await;
    daemon.kill().await;
    let mut acknowledged = Vec::new();
    while let Some(result) = calls.join_next().await {
        if let Ok(name) = result.unwrap() {
            acknowledged.push(name);
        }
    }
    assert!(acknowledged.len() >= 20);

    let restarted = Daemon::start(&db).await;
    let mut client = restarted.client().await;
    let after = phases(&mut client, "r1", "a0").await;
    for name in &acknowledged {
        assert_eq!(
            after.get(name),
            Some(&QUEUED),
            "{name} was acknowledged but lost"
        );
    }
    restarted.stop().await;
}

#[sqlx::test(migrations = "migrations/postgres")]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn killed_listen_connection_still_converges(pool: PgPool) {
    let a = Daemon::start(&TestDb::postgres(pool.clone())).await;
    let b = Daemon::start(&TestDb::postgres(pool.clone())).await;
    let mut via_a = a.client().await;
    let mut via_b = b.client().await;
    via_a.enqueue(task("r1", "a0", None)).await.unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for name in &names {
        via_a.enqueue(task("r1", name, Some("a0"))).await.unwrap();
    }
    let mut on_b = Watcher::open(&mut via_b, "r1", "a0").await;

    let listeners = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'actionsd-listener'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    eventually("both listeners", || async { listeners().await == 2 }).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'actionsd-listener'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true, true]);

    // Changes made through A while B's feed connection is gone.
    for name in &names {
        via_a
            .update(status_update("r1", name, 1, RUNNING))
            .await
            .unwrap();
        via_a
            .update(status_update("r1", name, 1, SUCCEEDED))
            .await
            .unwrap();
    }
    on_b.until(|p| names.iter().all(|n| p.get(n) == Some(&SUCCEEDED)))
        .await;
    // Both daemons re-established their LISTEN connection.
    eventually("listeners reconnected", || async { listeners().await == 2 }).await;

    // And wake-ups flow again: a new change through A reaches B.
    via_a
        .enqueue(task("r1", "after", Some("a0")))
        .await
        .unwrap();
    on_b.until_phase("after", QUEUED).await;
    a.stop().await;
    b.stop().await;
}

#[sqlx::test(migrations = "migrations/postgres")]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn database_outage_gives_unavailable_then_recovers(pool: PgPool) {
    let daemon = Daemon::start(&TestDb::postgres(pool.clone())).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();

    set_database_reachable(&pool, false).await;

    let status = client
        .enqueue(task("r1", "a1", Some("a0")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    set_database_reachable(&pool, true).await;
    // The daemon recovers by itself.
    eventually("enqueue after the outage", || {
        let mut client = client.clone();
        async move { client.enqueue(task("r1", "a1", Some("a0"))).await.is_ok() }
    })
    .await;
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    watcher.until_phase("a1", RUNNING).await;
    daemon.stop().await;
}

#[sqlx::test(migrations = false)]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn migrations_apply_to_an_empty_database_once(pool: PgPool) {
    let options: PgConnectOptions = pool.connect_options().as_ref().clone();
    let store = PgStore::connect(
        options,
        &PoolSettings {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        },
    );
    assert!(store.check_migrations().await.is_err());
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.check_migrations().await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        vec![
            "_sqlx_migrations",
            "actions",
            "events",
            "feed_positions",
            "run_purges",
            "runs"
        ]
    );
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    let embedded: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(applied, embedded);
    // Every migration file is embedded.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(embedded.len(), files);
    store.close().await;
}
