//! Scenarios b and c: WatchForUpdates under a stream of Updates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actionsd::proto::flyteidl2::actions::watch_for_updates_request::Filter;
use actionsd::proto::flyteidl2::actions::watch_for_updates_response::Message;
use actionsd::proto::flyteidl2::actions::{WatchForUpdatesRequest, WatchForUpdatesResponse};
use actionsd::proto::flyteidl2::workflow::ActionUpdate;
use anyhow::{anyhow, bail, Context};
use tokio_stream::StreamExt;
use tonic::Streaming;

use crate::daemon::{Backend, CpuSample, Target};
use crate::load::{self, phase, Actions, Matcher};
use crate::report::{peak, thousands, Report};
use crate::Settings;

/// How long a stream may take to send its snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens a watch on `run`'s root and reads its snapshot, up to the
/// sentinel. Returns the stream and the snapshot's updates.
async fn watch(
    client: &mut Actions,
    run: &str,
) -> anyhow::Result<(Streaming<WatchForUpdatesResponse>, Vec<ActionUpdate>)> {
    let request = WatchForUpdatesRequest {
        filter: Some(Filter::ParentActionId(load::aid(run, "a0"))),
    };
    let mut stream = client
        .watch_for_updates(request)
        .await
        .context("WatchForUpdates failed")?
        .into_inner();
    let mut snapshot = Vec::new();
    let read = async {
        loop {
            match stream.next().await {
                Some(Ok(response)) => match response.message {
                    Some(Message::ActionUpdate(update)) => snapshot.push(update),
                    Some(Message::ControlMessage(_)) => return Ok(()),
                    None => {}
                },
                Some(Err(status)) => bail!("watch stream failed: {status}"),
                None => bail!("watch stream ended before its sentinel"),
            }
        }
    };
    tokio::time::timeout(SNAPSHOT_TIMEOUT, read)
        .await
        .map_err(|_| anyhow!("no sentinel within {SNAPSHOT_TIMEOUT:?}"))??;
    Ok((stream, snapshot))
}

/// The update → watch cycle of one child: step `s` reports this phase…
fn cycle_phase(step: usize) -> i32 {
    [
        phase::WAITING_FOR_RESOURCES,
        phase::INITIALIZING,
        phase::RUNNING,
        phase::QUEUED,
    ][step % 4]
}

/// …in this attempt (QUEUED starts the next attempt).
fn cycle_attempt(step: usize) -> u32 {
    u32::try_from(1 + (step + 1) / 4).unwrap_or(u32::MAX)
}

/// Scenario b: one parent with 1,000 children and a watcher on it;
/// updates at 1,000/s; time from each Update's response to the watcher
/// receiving the change.
pub async fn update_watch(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let target = Target::start(settings, Backend::Postgres).await?;
    let result = update_watch_on(settings, &target, report).await;
    target.stop().await;
    result
}

async fn update_watch_on(
    settings: &Settings,
    target: &Target,
    report: &mut Report,
) -> anyhow::Result<()> {
    let children = settings.size(1_000, 200);
    let rate = settings.size(1_000, 200) as f64;
    let workers = 32;
    let run = format!("uw{}", std::process::id());
    let channels = load::connect(&target.url, 4).await?;
    load::populate(
        &channels,
        std::slice::from_ref(&run),
        children,
        &load::task_spec(900),
    )
    .await?;

    let mut watcher = Actions::new(channels[0].clone());
    let (mut stream, snapshot) = watch(&mut watcher, &run).await?;
    if snapshot.len() != children + 1 {
        bail!(
            "the snapshot holds {} actions, not {}",
            snapshot.len(),
            children + 1
        );
    }
    // Keyed by (child, step).
    let matcher = Arc::new(Matcher::<(usize, usize)>::new());
    let reader = {
        let matcher = matcher.clone();
        tokio::spawn(async move {
            // The next step expected of each child.
            let mut next: HashMap<usize, usize> = HashMap::new();
            while let Some(message) = stream.next().await {
                let Some(Message::ActionUpdate(update)) = message?.message else {
                    continue;
                };
                let Some(child) = update
                    .action_id
                    .as_ref()
                    .and_then(|id| id.name.strip_prefix('c'))
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                // The first step at or after the expected one with this
                // phase (intermediate ones may have been coalesced).
                let expected = next.entry(child).or_insert(0);
                if let Some(step) =
                    (*expected..*expected + 4).find(|s| cycle_phase(*s) == update.phase)
                {
                    *expected = step + 1;
                    matcher.delivered((child, step));
                }
            }
            anyhow::Ok(())
        })
    };

    let cpu_before = CpuSample::take(target.pid());
    let max_ops = (rate * settings.duration.as_secs_f64()) as usize;
    let op = {
        let channels = channels.clone();
        let matcher = matcher.clone();
        let run = run.clone();
        move |worker: usize, i: usize| {
            let mut client = Actions::new(channels[worker % channels.len()].clone());
            let matcher = matcher.clone();
            let run = run.clone();
            async move {
                // Worker w owns children w, w + 32, …; it goes round them.
                let owned = (children - worker).div_ceil(workers);
                let child = worker + workers * (i % owned);
                let step = i / owned;
                let request = load::update(
                    &run,
                    &format!("c{child}"),
                    cycle_attempt(step),
                    cycle_phase(step),
                );
                client
                    .update(load::request(request))
                    .await
                    .context("Update failed")?;
                matcher.acknowledged((child, step));
                anyhow::Ok(())
            }
        }
    };
    let (count, elapsed) = load::paced(workers, rate, settings.duration, max_ops, op).await?;
    let cpu = CpuSample::take(target.pid()).since(&cpu_before);
    // Let the last deliveries arrive.
    let deadline = Instant::now() + Duration::from_secs(2);
    while matcher.undelivered() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    let latency = matcher.latency();
    let undelivered = matcher.undelivered();
    report.figure(
        "update → watch",
        "Update response → watcher",
        latency.summary(),
        "p99 ≤ 5 ms",
        format!(
            "{} updates/s achieved of {} asked, {} children; {undelivered} not delivered; {}",
            thousands(count as f64 / elapsed.as_secs_f64()),
            thousands(rate),
            children,
            peak(target.peak_rss_kib())
        ),
    );
    report.context(cpu);
    if undelivered > 0 {
        report.fail(format!(
            "update → watch: {undelivered} acknowledged updates never reached the watcher"
        ));
    }
    Ok(())
}

/// Rank of a phase in the forward-only sequence fan-out children follow.
fn rank(phase: i32) -> i32 {
    match phase {
        phase::QUEUED => 1,
        phase::WAITING_FOR_RESOURCES => 2,
        phase::INITIALIZING => 3,
        phase::RUNNING => 4,
        _ => 5,
    }
}

/// The forward-only steps of a fan-out child.
const FORWARD: [i32; 4] = [
    phase::WAITING_FOR_RESOURCES,
    phase::INITIALIZING,
    phase::RUNNING,
    phase::SUCCEEDED,
];

/// Scenario c: 10,000 WatchForUpdates streams over 1,000 parents while
/// 5,000 updates/s flow: delivery rate, daemon memory per idle stream, and
/// backwards versions seen by any stream (must be 0).
pub async fn fanout(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let target = Target::start(settings, Backend::Postgres).await?;
    let result = fanout_on(settings, &target, report).await;
    target.stop().await;
    result
}

async fn fanout_on(
    settings: &Settings,
    target: &Target,
    report: &mut Report,
) -> anyhow::Result<()> {
    let parents = settings.size(1_000, 50);
    let streams = settings.size(10_000, 500);
    let rate = settings.size(5_000, 500) as f64;
    let per_connection = 500;
    let workers = 128.min(parents);
    let secs = settings.duration.as_secs_f64();
    // Each child takes four updates; enough children for the whole run.
    let children = ((rate * secs / parents as f64) / 4.0).ceil() as usize + 1;
    let nonce = std::process::id();
    let runs: Vec<String> = (0..parents).map(|p| format!("f{nonce}-{p}")).collect();
    let setup_channels = load::connect(&target.url, 4).await?;
    let setup_start = Instant::now();
    load::populate(&setup_channels, &runs, children, &load::task_spec(900)).await?;
    println!(
        "      setup: {} parents × {} children enqueued in {:.1} s",
        parents,
        children,
        setup_start.elapsed().as_secs_f64()
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = target.rss_kib();
    let channels = load::connect(&target.url, streams.div_ceil(per_connection)).await?;
    let received = Arc::new(AtomicU64::new(0));
    let backwards = Arc::new(AtomicU64::new(0));
    let opened = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(streams);
    for s in 0..streams {
        let mut client = Actions::new(channels[s % channels.len()].clone());
        let run = runs[s % parents].clone();
        let received = received.clone();
        let backwards = backwards.clone();
        let ready = ready_tx.clone();
        readers.spawn(async move {
            let (mut stream, snapshot) = match watch(&mut client, &run).await {
                Ok(opened) => opened,
                Err(err) => {
                    let _ = ready.send(Err(err)).await;
                    return;
                }
            };
            let mut last: HashMap<String, i32> = snapshot
                .into_iter()
                .filter_map(|u| Some((u.action_id?.name, rank(u.phase))))
                .collect();
            let _ = ready.send(Ok(())).await;
            drop(ready);
            while let Some(Ok(response)) = stream.next().await {
                let Some(Message::ActionUpdate(update)) = response.message else {
                    continue;
                };
                received.fetch_add(1, Ordering::Relaxed);
                let Some(id) = update.action_id else { continue };
                let now = rank(update.phase);
                let before = last.insert(id.name, now).unwrap_or(0);
                if now < before {
                    backwards.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    drop(ready_tx);
    for _ in 0..streams {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(err)) => return Err(err.context("a watch stream failed to open")),
            None => bail!("the watch streams stopped before their snapshots"),
        }
    }
    let open_secs = opened.elapsed().as_secs_f64();
    // Idle streams: let the daemon settle, then weigh it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = target.rss_kib();
    let per_stream = match (rss_before, rss_idle) {
        (Some(before), Some(idle)) => Some(idle.saturating_sub(before) as f64 / streams as f64),
        _ => None,
    };
    report.figure(
        "fan-out",
        "daemon memory per idle stream",
        per_stream.map_or_else(|| "n/a".to_owned(), |kib| format!("{kib:.1} KiB")),
        "≤ 16 KiB",
        format!(
            "{} streams over {} parents on {} connections, opened (with snapshots) in {open_secs:.1} s",
            thousands(streams as f64),
            thousands(parents as f64),
            channels.len()
        ),
    );

    let cpu_before = CpuSample::take(target.pid());
    let max_ops = (rate * secs) as usize;
    let update_channels = load::connect(&target.url, 8).await?;
    let op = {
        let runs = runs.clone();
        move |worker: usize, i: usize| {
            let mut client = Actions::new(update_channels[worker % update_channels.len()].clone());
            let owned = (parents - worker).div_ceil(workers);
            let parent = worker + workers * (i % owned);
            let round = i / owned;
            let run = runs[parent].clone();
            async move {
                let child = round / 4;
                if child >= children {
                    return anyhow::Ok(());
                }
                let request = load::update(&run, &format!("c{child}"), 1, FORWARD[round % 4]);
                client
                    .update(load::request(request))
                    .await
                    .context("Update failed")?;
                anyhow::Ok(())
            }
        }
    };
    let received_before = received.load(Ordering::Relaxed);
    let (count, elapsed) = load::paced(workers, rate, settings.duration, max_ops, op).await?;
    let cpu = CpuSample::take(target.pid()).since(&cpu_before);
    // Deliveries still in flight count, up to 2 s after the last update.
    let expected = count as u64 * (streams / parents) as u64;
    let deadline = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) - received_before < expected && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = received.load(Ordering::Relaxed) - received_before;
    let delivery_secs = elapsed.as_secs_f64();
    readers.abort_all();
    let backwards = backwards.load(Ordering::Relaxed);
    report.figure(
        "fan-out",
        "deliveries/s",
        format!("{}/s", thousands(delivered as f64 / delivery_secs)),
        "every update to every watcher",
        format!(
            "{} updates/s achieved of {} asked; {} of {} expected deliveries ({:.1}%); {}",
            thousands(count as f64 / delivery_secs),
            thousands(rate),
            thousands(delivered as f64),
            thousands(expected as f64),
            100.0 * delivered as f64 / expected.max(1) as f64,
            peak(target.peak_rss_kib())
        ),
    );
    report.context(cpu);
    report.figure(
        "fan-out",
        "backwards versions seen",
        backwards.to_string(),
        "0",
        String::new(),
    );
    if backwards > 0 {
        report.fail(format!("fan-out: {backwards} backwards versions seen"));
    }
    Ok(())
}
