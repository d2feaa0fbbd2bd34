//! A network between the daemon and Postgres that goes silent, refuses or
//! cuts connections (through a fault-injecting proxy, `common::faultproxy`):
//! requests answer UNAVAILABLE in bounded time, watch streams end with
//! UNAVAILABLE, and the daemon recovers by itself.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy};
use common::*;
use sqlx::{ConnectOptions, PgPool};
use tonic::Code;

/// Retries `call` until it succeeds, within TIMEOUT.
async fn eventually<F, Fut, T>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(status)) if Instant::now() < deadline => {
                assert!(
                    matches!(status.code(), Code::Unavailable | Code::Internal),
                    "unexpected status while recovering: {status:?}"
                );
            }
            Err(_) if Instant::now() < deadline => {}
            other => panic!(
                "no recovery within {TIMEOUT:?}: {:?}",
                other.map(|r| r.err())
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first message-level end of a stream: its error status.
async fn stream_end(watcher: &mut Watcher) -> tonic::Status {
    loop {
        match watcher.stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => return status,
        }
    }
}

#[sqlx::test(migrations = "migrations/postgres")]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn a_silent_refusing_or_cut_database_gives_unavailable_in_bounded_time(pool: PgPool) {
    let options = pool.connect_options().as_ref().clone();
    let upstream: SocketAddr = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .expect("the test database is reachable over IPv4 loopback");
    let proxy = FaultProxy::start(upstream).await;
    let url = options
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .to_url_lossy()
        .to_string();
    let daemon = Daemon::start_url_with(&url, |config| {
        config.database.statement_timeout = Duration::from_millis(500);
        config.database.acquire_timeout = Duration::from_secs(1);
        config.pipeline.unavailable_after = Duration::from_secs(1);
    })
    .await;
    let mut client = daemon.client().await;
    client.enqueue(task("bh", "a0", None)).await.unwrap();
    let mut watchers = Vec::new();
    for _ in 0..4 {
        watchers.push(Watcher::open(&mut client, "bh", "a0").await);
    }

    // Blackhole: a write answers UNAVAILABLE within the operation bound
    // (statement_timeout + 1 s), and every stream ends with UNAVAILABLE.
    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let write = tokio::time::timeout(
        Duration::from_secs(10),
        client.enqueue(task("bh", "a1", Some("a0"))),
    )
    .await
    .expect("Enqueue answers despite a silent database");
    let message = expect_code(write, Code::Unavailable);
    let write_took = started.elapsed();
    assert!(
        write_took < Duration::from_secs(4),
        "{write_took:?}: {message}"
    );
    for watcher in &mut watchers {
        let end = tokio::time::timeout(Duration::from_secs(15), stream_end(watcher))
            .await
            .expect("the stream ends despite a silent database");
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    }
    let streams_took = started.elapsed();
    assert!(streams_took < Duration::from_secs(10), "{streams_took:?}");

    // The network returns: the daemon recovers by itself.
    proxy.set(Fault::None);
    eventually(|| {
        let mut client = client.clone();
        async move { client.enqueue(task("bh", "a1", Some("a0"))).await }
    })
    .await;
    let seen = phases(&mut client, "bh", "a0").await;
    assert_eq!(seen.get("a1"), Some(&QUEUED));

    // Refused connections: UNAVAILABLE within the acquire timeout.
    proxy.set(Fault::Refuse);
    proxy.cut();
    let started = Instant::now();
    let write = tokio::time::timeout(
        Duration::from_secs(10),
        client.enqueue(task("bh", "a2", Some("a0"))),
    )
    .await
    .expect("Enqueue answers while connections are refused");
    expect_code(write, Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    proxy.set(Fault::None);
    eventually(|| {
        let mut client = client.clone();
        async move { client.enqueue(task("bh", "a2", Some("a0"))).await }
    })
    .await;

    // Cut connections: the daemon reconnects, and a fresh stream sees
    // everything acknowledged.
    proxy.cut();
    eventually(|| {
        let mut client = client.clone();
        async move { client.enqueue(task("bh", "a3", Some("a0"))).await }
    })
    .await;
    let phases = phases(&mut client, "bh", "a0").await;
    for name in ["a0", "a1", "a2", "a3"] {
        assert_eq!(phases.get(name), Some(&QUEUED), "{name}: {phases:?}");
    }
    daemon.stop().await;
}
