//! Scenario a: Enqueue throughput and latency at 1, 16 and 64 clients,
//! beside pgbench running the same writes.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::daemon::{Backend, CpuSample, Target};
use crate::load::{self, Actions};
use crate::report::{peak, ratio, thousands, Latency, Report};
use crate::{pgbench, Settings};

/// Clients per HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 8;

/// pgbench's one-transaction enqueue rate per client count, measured with
/// the Postgres run and shown beside the SQLite one too.
pub type Ceilings = std::collections::HashMap<usize, f64>;

pub async fn run(
    settings: &Settings,
    backend: Backend,
    ceilings: &mut Ceilings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let target = Target::start(settings, backend).await?;
    let result = measure(settings, backend, &target, ceilings, report).await;
    target.stop().await;
    result
}

async fn measure(
    settings: &Settings,
    backend: Backend,
    target: &Target,
    ceilings: &mut Ceilings,
    report: &mut Report,
) -> anyhow::Result<()> {
    // pgbench needs the daemon's tables (it copies them) in the bench
    // database, which only a Postgres daemon started here has migrated.
    let ceiling = backend == Backend::Postgres && settings.server.is_none();
    if ceiling {
        pgbench::setup(settings).await?;
    }
    let spec = load::task_spec(900);
    for clients in [1usize, 16, 64] {
        let scenario = format!("enqueue {backend} ×{clients}");
        let channels = load::connect(&target.url, clients.div_ceil(CLIENTS_PER_CONNECTION)).await?;
        let batches_before = target.batches();
        let cpu_before = CpuSample::take(target.pid());
        let (count, elapsed, latency) =
            enqueue_load(&channels, clients, settings.duration, &spec).await?;
        let cpu = CpuSample::take(target.pid()).since(&cpu_before);
        let rate = count as f64 / elapsed.as_secs_f64();
        let mut note = String::new();
        if ceiling {
            ceilings.insert(clients, pgbench::enqueue_tps(settings, clients).await?);
        }
        let tps = ceilings.get(&clients).copied();
        if let Some(tps) = tps {
            note = format!(
                "pgbench one-tx enqueue {} tx/s → {}",
                thousands(tps),
                ratio(rate, Some(tps))
            );
        }
        let target_text = match (backend, clients) {
            (Backend::Postgres, 16) => "≥ 1.0× pgbench",
            (Backend::Postgres, 64) => "≥ 3× pgbench",
            _ => "—",
        };
        report.figure(
            &scenario,
            "enqueues/s",
            format!("{}/s ({})", thousands(rate), ratio(rate, tps)),
            target_text,
            note,
        );
        report.figure(
            &scenario,
            "Enqueue latency",
            latency.summary(),
            "—",
            peak(target.peak_rss_kib()),
        );
        report.context(cpu);
        if let (Some((c0, b0)), Some((c1, b1))) = (batches_before, target.batches()) {
            if b1 > b0 {
                report.context(format!(
                    "{:.1} commands per transaction",
                    (c1 - c0) as f64 / (b1 - b0) as f64
                ));
            }
        }
        if clients == 16 && backend == Backend::Postgres {
            report.context(
                "Postgres job queues (16 producers, single-job calls): 640–1,440 enqueues/s"
                    .to_owned(),
            );
        }
    }
    Ok(())
}

/// `clients` tasks, each enqueueing children of its own run's root one
/// call at a time, for `duration` (and at most 1,000,000 calls).
pub(crate) async fn enqueue_load(
    channels: &[tonic::transport::Channel],
    clients: usize,
    duration: Duration,
    spec: &bytes::Bytes,
) -> anyhow::Result<(usize, Duration, Latency)> {
    const MAX_CALLS: usize = 1_000_000;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let runs: Vec<String> = (0..clients).map(|c| format!("e{nonce}-{c}")).collect();
    load::populate(channels, &runs, 0, spec).await?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, run) in runs.into_iter().enumerate() {
        let mut client = Actions::new(channels[c % channels.len()].clone());
        let spec = spec.clone();
        tasks.spawn(async move {
            let mut latency = Latency::new();
            let mut i = 0;
            while start.elapsed() < duration && i < MAX_CALLS / clients {
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
