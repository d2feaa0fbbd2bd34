//! Enqueue latency while a retention pass deletes 100,000 finished
//! actions, beside the same load without it (Postgres).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actionsd::config::RetentionConfig;
use actionsd::store::postgres::{PgStore, PoolSettings};
use actionsd::store::Store;
use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::daemon::{Backend, Target};
use crate::load::{self, Actions};
use crate::report::{thousands, Latency, Report};
use crate::Settings;

const CLIENTS: usize = 16;
const ACTIONS_PER_RUN: usize = 100;

pub async fn retention(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    if settings.server.is_some() {
        report.context("retention: needs the bench database; not run with --server".to_owned());
        return Ok(());
    }
    let target = Target::start(settings, Backend::Postgres).await?;
    let result = measure(settings, &target, report).await;
    target.stop().await;
    result
}

async fn measure(settings: &Settings, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let actions = settings.size(100_000, 2_000);
    let runs = actions / ACTIONS_PER_RUN;
    let options = PgConnectOptions::from_str(&settings.database_url)?;
    let store = PgStore::connect(
        options,
        &PoolSettings {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
        },
    );
    seed(store.pool(), runs).await?;
    feed_past_seeded_events(store.pool()).await?;
    let channels = load::connect(&target.url, CLIENTS.div_ceil(8)).await?;
    let spec = load::task_spec(900);

    // The same load twice: alone, then while a pass runs; each for the
    // time the pass takes (at least one second), at most `duration`.
    let config = RetentionConfig {
        enabled: true,
        period: Duration::from_secs(3600),
        interval: Duration::from_secs(600),
        batch_size: 100,
        batch_pause: Duration::from_millis(10),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(enqueue_until(
        channels.clone(),
        spec.clone(),
        stop.clone(),
        settings.duration * 3,
    ));
    let started = Instant::now();
    let deleted = actionsd::retention::pass(&store, &config, &CancellationToken::new())
        .await
        .context("the retention pass failed")?;
    let pass_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(pass_time)).await;
    stop.store(true, Ordering::Relaxed);
    let (during_count, during_time, during) = load.await??;
    let alone_for = during_time;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(enqueue_until(channels, spec, stop.clone(), alone_for));
    let (alone_count, alone_time, alone) = load.await??;
    store.close().await;
    anyhow::ensure!(
        deleted.actions as usize == actions,
        "the pass deleted {} actions of {actions}",
        deleted.actions
    );
    report.figure(
        "retention pass",
        "deleted",
        format!(
            "{} runs, {} actions, {} events in {:.2} s",
            thousands(deleted.runs as f64),
            thousands(deleted.actions as f64),
            thousands(deleted.events as f64),
            pass_time.as_secs_f64()
        ),
        "—",
        String::new(),
    );
    report.figure(
        &format!("enqueue ×{CLIENTS} during retention"),
        "Enqueue latency",
        during.summary(),
        "p99 ≤ 2× without",
        format!(
            "{}/s",
            thousands(during_count as f64 / during_time.as_secs_f64())
        ),
    );
    report.figure(
        &format!("enqueue ×{CLIENTS} without retention"),
        "Enqueue latency",
        alone.summary(),
        "—",
        format!(
            "{}/s",
            thousands(alone_count as f64 / alone_time.as_secs_f64())
        ),
    );
    Ok(())
}

/// Finished runs of `ACTIONS_PER_RUN` actions (all SUCCEEDED a day ago),
/// two events each, written straight into the tables.
/// Retention leaves a run whose events a live feed position has not
/// passed yet; runs that finished a retention period ago are far behind
/// every position, but the seeded runs are new: wait (bounded) until the
/// daemon's recorded position has passed them.
async fn feed_past_seeded_events(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM feed_positions f, \
               (SELECT xid, seq FROM events ORDER BY xid DESC, seq DESC LIMIT 1) e \
             WHERE f.expires_at > now() AND (f.xid, f.seq) < (e.xid, e.seq)",
        )
        .fetch_one(pool)
        .await?;
        if behind == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the daemon's feed position did not pass the seeded events within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn seed(pool: &sqlx::PgPool, runs: usize) -> anyhow::Result<()> {
    let runs = i64::try_from(runs)?;
    let children = i64::try_from(ACTIONS_PER_RUN - 1)?;
    let statements = [
        "INSERT INTO runs (org, project, domain, name, root_name, run_spec) \
         SELECT '', 'bench', 'retention', 'old' || r, 'a0', '\\x00'::bytea \
         FROM generate_series(1, $1) r",
        "INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, \
             spec, start_time, end_time, created_at) \
         SELECT '', 'bench', 'retention', 'old' || r, \
             CASE WHEN c = 0 THEN 'a0' ELSE 'c' || c END, \
             CASE WHEN c = 0 THEN NULL ELSE 'a0' END, 1, 5, '\\x00'::bytea, \
             now() - interval '25 hours', now() - interval '1 day', now() - interval '2 days' \
         FROM generate_series(1, $1) r, generate_series(0, $2) c",
        "INSERT INTO events (org, project, domain, run_name, name, parent_name, version, phase, \
             attempt, output_uri) \
         SELECT org, project, domain, run_name, name, parent_name, v, \
             CASE WHEN v = 1 THEN 1 ELSE 5 END, 1, '' \
         FROM actions, generate_series(1, 2) v WHERE project = 'bench' AND domain = 'retention'",
        "ANALYZE",
    ];
    for statement in statements {
        sqlx::query(statement)
            .bind(runs)
            .bind(children)
            .execute(pool)
            .await
            .with_context(|| format!("seeding: {statement}"))?;
    }
    Ok(())
}

/// `CLIENTS` tasks enqueueing children of their own runs one call at a
/// time until `stop` (or `limit`, or 1,000,000 calls in all).
async fn enqueue_until(
    channels: Vec<tonic::transport::Channel>,
    spec: bytes::Bytes,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> anyhow::Result<(usize, Duration, Latency)> {
    const MAX_CALLS: usize = 1_000_000;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let runs: Vec<String> = (0..CLIENTS).map(|c| format!("t{nonce}-{c}")).collect();
    load::populate(&channels, &runs, 0, &spec).await?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, run) in runs.into_iter().enumerate() {
        let mut client = Actions::new(channels[c % channels.len()].clone());
        let (spec, stop) = (spec.clone(), stop.clone());
        tasks.spawn(async move {
            let mut latency = Latency::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed)
                && start.elapsed() < limit
                && i < MAX_CALLS / CLIENTS
            {
                let request = load::enqueue(&run, &format!("c{i}"), Some("a0"), &spec);
                let sent = Instant::now();
                client
                    .enqueue(load::request(request))
                    .await
                    .context("Enqueue failed")?;
                latency.record(sent.elapsed());
                i += 1;
            }
            anyhow::Ok((i, latency))
        });
    }
    let mut total = 0;
    let mut latency = Latency::new();
    while let Some(result) = tasks.join_next().await {
        let (count, own) = result??;
        total += count;
        latency.add(&own);
    }
    Ok((total, start.elapsed(), latency))
}
