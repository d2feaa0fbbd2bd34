//! Scenario d: executors leasing through ExecutorService — the drain of a
//! backlog, and the dispatch latency of a steady trickle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actionsd::proto::actionsd::executor::v1::{
    lease_response, FinishRequest, LeaseRequest, LeasedAction,
};
use anyhow::{bail, Context};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::daemon::{Backend, CpuSample, Target};
use crate::load::{self, phase, Actions, Executors, Matcher};
use crate::report::{peak, ratio, thousands, Report};
use crate::{pgbench, Settings};

/// Runs a no-op executor: leases from `queue` with `capacity` and finishes
/// every action SUCCEEDED at once (each Finish in a task of its own, as a
/// real executor runs actions side by side), calling `leased` first.
/// Stops when `stop` fires; fails on any error.
async fn executor(
    channel: tonic::transport::Channel,
    id: String,
    capacity: u32,
    finished: Arc<AtomicUsize>,
    leased: impl Fn(&LeasedAction) + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = Executors::new(channel);
    let mut stream = client
        .lease(LeaseRequest {
            executor_id: id.clone(),
            queue: "default".to_owned(),
            capacity,
            max_leases: 0,
        })
        .await
        .context("Lease failed")?
        .into_inner();
    let mut finishes = tokio::task::JoinSet::new();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.next() => message,
            Some(result) = finishes.join_next(), if !finishes.is_empty() => {
                result??;
                continue;
            }
        };
        let action = match message {
            Some(Ok(response)) => match response.event {
                Some(lease_response::Event::Leased(action)) => action,
                _ => continue,
            },
            Some(Err(status)) => bail!("lease stream failed: {status}"),
            None => bail!("lease stream ended"),
        };
        leased(&action);
        let mut client = client.clone();
        let finished = finished.clone();
        let request = FinishRequest {
            executor_id: id.clone(),
            action_id: action.action_id,
            attempt: action.attempt,
            phase: phase::SUCCEEDED,
            output_uri: String::new(),
            error: None,
            retry: false,
        };
        finishes.spawn(async move {
            client
                .finish(load::request(request))
                .await
                .context("Finish failed")?;
            finished.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok(())
        });
    }
    while let Some(result) = finishes.join_next().await {
        result??;
    }
    Ok(())
}

/// 4 executors with capacity 16 drain 20,000 queued no-op actions: lease →
/// Finish SUCCEEDED. Beside it, pgbench's SKIP LOCKED claim of 10 at a time
/// with as many clients.
pub async fn drain(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let target = Target::start(settings, Backend::Postgres).await?;
    let result = drain_on(settings, &target, report).await;
    target.stop().await;
    result
}

async fn drain_on(settings: &Settings, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    const EXECUTORS: usize = 4;
    const CAPACITY: u32 = 16;
    let total = settings.size(20_000, 1_000);
    let runs_count = 20;
    let limit = if settings.smoke {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(60)
    };
    let nonce = std::process::id();
    let runs: Vec<String> = (0..runs_count).map(|r| format!("d{nonce}-{r}")).collect();
    let channels = load::connect(&target.url, 4).await?;
    let setup = Instant::now();
    load::populate(&channels, &runs, total / runs_count, &load::task_spec(900)).await?;
    println!(
        "      setup: {} actions enqueued in {:.1} s",
        thousands(total as f64),
        setup.elapsed().as_secs_f64()
    );
    if settings.server.is_none() {
        // As pgbench's queue is: a queue filled faster than autovacuum
        // analyzes it is planned as empty, and each claim then sorts the
        // whole backlog (see BENCHMARKS.md).
        pgbench::analyze(settings).await?;
    }

    let finished = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let cpu_before = CpuSample::take(target.pid());
    let batches_before = target.batches();
    let start = Instant::now();
    let mut executors = tokio::task::JoinSet::new();
    for e in 0..EXECUTORS {
        executors.spawn(executor(
            channels[e % channels.len()].clone(),
            format!("bench-drain-{e}"),
            CAPACITY,
            finished.clone(),
            |_| {},
            stop.clone(),
        ));
    }
    // Done when every action finished, or at the time limit.
    let mut failure = None;
    while finished.load(Ordering::Relaxed) < total && start.elapsed() < limit {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
            Some(result) = executors.join_next() => {
                failure = Some(result.map_err(anyhow::Error::from).and_then(|r| r).err()
                    .unwrap_or_else(|| anyhow::anyhow!("an executor stopped early")));
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let done = finished.load(Ordering::Relaxed);
    let cpu = CpuSample::take(target.pid()).since(&cpu_before);
    let batches_after = target.batches();
    stop.cancel();
    while let Some(result) = executors.join_next().await {
        if let Err(err) = result.map_err(anyhow::Error::from).and_then(|r| r) {
            failure.get_or_insert(err);
        }
    }
    if let Some(err) = failure {
        return Err(err.context("an executor failed"));
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    let claim = if settings.server.is_none() {
        pgbench::setup(settings).await?;
        Some(pgbench::claimed_per_second(settings, EXECUTORS, total).await?)
    } else {
        None
    };
    let mut note = format!(
        "{} of {} actions in {:.1} s",
        thousands(done as f64),
        thousands(total as f64),
        elapsed.as_secs_f64()
    );
    if let Some(claimed) = claim {
        note.push_str(&format!(
            "; pgbench SKIP LOCKED claim (10 per claim, {EXECUTORS} clients, same depth) {} claimed/s → {}",
            thousands(claimed),
            ratio(rate, Some(claimed))
        ));
    }
    note.push_str("; Postgres job queues: 1,650–4,390 jobs/s end to end; ");
    note.push_str(&peak(target.peak_rss_kib()));
    report.figure(
        &format!("executor drain ×{EXECUTORS}"),
        "actions/s (lease → Finish)",
        format!("{}/s ({})", thousands(rate), ratio(rate, claim)),
        "≥ 0.5× pgbench claim",
        note,
    );
    report.context(cpu);
    if let (Some((c0, b0)), Some((c1, b1))) = (batches_before, batches_after) {
        if b1 > b0 {
            report.context(format!(
                "{:.1} Finish commands per transaction",
                (c1 - c0) as f64 / (b1 - b0) as f64
            ));
        }
    }
    if done < total {
        report.fail(format!(
            "executor drain: only {done} of {total} actions finished within {limit:?}"
        ));
    }
    Ok(())
}

/// Enqueues at a steady 200/s while an idle executor waits: time from each
/// Enqueue's response to the executor receiving its lease.
pub async fn dispatch(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let target = Target::start(settings, Backend::Postgres).await?;
    let result = dispatch_on(settings, &target, report).await;
    target.stop().await;
    result
}

async fn dispatch_on(
    settings: &Settings,
    target: &Target,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rate = 200.0;
    let workers = 4;
    let run = format!("dl{}", std::process::id());
    let channels = load::connect(&target.url, 2).await?;
    let spec = load::task_spec(900);
    load::populate(&channels, std::slice::from_ref(&run), 0, &spec).await?;

    let matcher = Arc::new(Matcher::<String>::new());
    let finished = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let executor_task = {
        let matcher = matcher.clone();
        tokio::spawn(executor(
            channels[1].clone(),
            "bench-dispatch".to_owned(),
            16,
            finished.clone(),
            move |action| {
                if let Some(id) = &action.action_id {
                    matcher.delivered(id.name.clone());
                }
            },
            stop.clone(),
        ))
    };
    // Let the lease stream open and go idle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cpu_before = CpuSample::take(target.pid());
    let max_ops = (rate * settings.duration.as_secs_f64()) as usize;
    let op = {
        let channel = channels[0].clone();
        let matcher = matcher.clone();
        move |worker: usize, i: usize| {
            let mut client = Actions::new(channel.clone());
            let matcher = matcher.clone();
            let name = format!("w{worker}-{i}");
            let request = load::enqueue(&run, &name, Some("a0"), &spec);
            async move {
                client
                    .enqueue(load::request(request))
                    .await
                    .context("Enqueue failed")?;
                matcher.acknowledged(name);
                anyhow::Ok(())
            }
        }
    };
    let (count, elapsed) = load::paced(workers, rate, settings.duration, max_ops, op).await?;
    let cpu = CpuSample::take(target.pid()).since(&cpu_before);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (matcher.undelivered() > 0 || finished.load(Ordering::Relaxed) < count)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    executor_task.await??;
    let undelivered = matcher.undelivered();
    report.figure(
        "dispatch",
        "Enqueue response → lease",
        matcher.latency().summary(),
        "p99 ≤ 5 ms",
        format!(
            "{}/s enqueued for {:.1} s; {undelivered} not leased; Postgres job queues: enqueue → handler p99 14–174 ms; {}",
            thousands(count as f64 / elapsed.as_secs_f64()),
            elapsed.as_secs_f64(),
            peak(target.peak_rss_kib())
        ),
    );
    report.context(cpu);
    if undelivered > 0 {
        report.fail(format!(
            "dispatch: {undelivered} enqueued actions never leased"
        ));
    }
    Ok(())
}
