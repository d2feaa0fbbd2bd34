//! Executors: leasing, heartbeats, finishing, expiry, cancellation, limits.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actionsd::proto::actionsd::executor::v1::{
    lease_response, FinishRequest, HeartbeatRequest, LeaseRequest, LeasedAction,
};
use actionsd::proto::flyteidl2::core;
use common::*;
use tonic::Streaming;

conformance!(
    executors_drain_every_action_leasing_each_attempt_once,
    an_abandoned_lease_is_requeued_and_finished_elsewhere,
    exhausted_retries_fail_with_a_system_error,
    abort_of_a_leased_action_reaches_the_executor,
    an_unsignalled_condition_times_out,
    max_action_concurrency_caps_leases_per_run,
    finish_reports_outputs_and_errors_to_watchers,
    a_new_lease_stream_resends_unfinished_leases,
    a_run_at_its_limit_does_not_hide_other_work,
    a_retrying_finish_queues_the_next_attempt,
    a_parent_waiting_on_children_frees_its_slot_up_to_max_leases,
    a_cancellation_carries_one_reason_on_the_stream_and_in_the_heartbeat,
);

const DEFAULT_QUEUE: &str = "default";

async fn lease(
    executor: &mut ExecutorClient,
    id: &str,
    capacity: u32,
) -> Streaming<actionsd::proto::actionsd::executor::v1::LeaseResponse> {
    lease_bounded(executor, id, capacity, 0).await
}

async fn lease_bounded(
    executor: &mut ExecutorClient,
    id: &str,
    capacity: u32,
    max_leases: u32,
) -> Streaming<actionsd::proto::actionsd::executor::v1::LeaseResponse> {
    executor
        .lease(LeaseRequest {
            executor_id: id.into(),
            queue: DEFAULT_QUEUE.into(),
            capacity,
            max_leases,
        })
        .await
        .expect("lease stream opens")
        .into_inner()
}

/// The next leased action on a stream (cancellations are not expected).
async fn next_lease(
    stream: &mut Streaming<actionsd::proto::actionsd::executor::v1::LeaseResponse>,
) -> LeasedAction {
    let message = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("a lease in time")
        .expect("stream ok")
        .expect("stream open");
    match message.event {
        Some(lease_response::Event::Leased(leased)) => leased,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn finish(executor: &str, leased: &LeasedAction, phase: i32) -> FinishRequest {
    FinishRequest {
        executor_id: executor.into(),
        action_id: leased.action_id.clone(),
        attempt: leased.attempt,
        phase,
        output_uri: String::new(),
        error: None,
        retry: false,
    }
}

fn name(leased: &LeasedAction) -> String {
    leased.action_id.as_ref().unwrap().name.clone()
}

/// Enqueues a root and `n` children, at most 32 requests in flight.
async fn enqueue_children(client: &Client, run: &str, n: usize) -> Vec<String> {
    client.clone().enqueue(task(run, "a0", None)).await.unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
    let mut calls = tokio::task::JoinSet::new();
    for name in names.clone() {
        let mut client = client.clone();
        let run = run.to_owned();
        let in_flight = in_flight.clone();
        calls.spawn(async move {
            let _permit = in_flight.acquire_owned().await.unwrap();
            client.enqueue(task(&run, &name, Some("a0"))).await.unwrap();
        });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap();
    }
    names
}

async fn executors_drain_every_action_leasing_each_attempt_once(db: TestDb) {
    // Two daemons share Postgres; an SQLite file has one daemon.
    let daemons = if db.is_postgres() {
        vec![Daemon::start(&db).await, Daemon::start(&db).await]
    } else {
        vec![Daemon::start(&db).await]
    };
    let client = daemons[0].client().await;
    let total = 2000;
    let names = enqueue_children(&client, "r1", total).await;

    let leased: Arc<Mutex<HashSet<(String, u32)>>> = Arc::default();
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let mut executors = tokio::task::JoinSet::new();
    for e in 0..2 {
        let mut executor = daemons[e % daemons.len()].executor_client().await;
        let leased = leased.clone();
        let finished = finished.clone();
        executors.spawn(async move {
            let id = format!("executor-{e}");
            let mut stream = lease(&mut executor, &id, 16).await;
            loop {
                let action = next_lease(&mut stream).await;
                let fresh = leased
                    .lock()
                    .unwrap()
                    .insert((name(&action), action.attempt));
                assert!(
                    fresh,
                    "{} attempt {} leased twice",
                    name(&action),
                    action.attempt
                );
                executor
                    .finish(finish(&id, &action, SUCCEEDED))
                    .await
                    .unwrap();
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    // The root is a task too: total children + 1 actions to drain.
    let deadline = started + Duration::from_secs(120);
    while finished.load(std::sync::atomic::Ordering::SeqCst) < total + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained in time"
        );
        if let Some(result) = executors.try_join_next() {
            result.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("drained {} actions in {:?}", total + 1, started.elapsed());
    executors.abort_all();

    let mut client = client.clone();
    let phases = phases(&mut client, "r1", "a0").await;
    for name in &names {
        assert_eq!(phases[name], SUCCEEDED, "{name}");
    }
    {
        let leased = leased.lock().unwrap();
        assert_eq!(leased.len(), total + 1);
        assert!(leased.iter().all(|(_, attempt)| *attempt == 1));
    }
    for daemon in daemons {
        daemon.stop().await;
    }
}

fn short_leases(config: &mut actionsd::config::Config) {
    config.executor.lease_ttl = Duration::from_millis(700);
    config.executor.reaper_interval = Duration::from_millis(100);
}

async fn an_abandoned_lease_is_requeued_and_finished_elsewhere(db: TestDb) {
    let daemon = Daemon::start_with(&db, short_leases).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;

    // Executor A leases both, then dies: no heartbeat, no finish.
    let mut a = daemon.executor_client().await;
    let mut stream = lease(&mut a, "a", 2).await;
    let first = next_lease(&mut stream).await;
    let second = next_lease(&mut stream).await;
    assert_eq!((first.attempt, second.attempt), (1, 1));
    drop(stream);

    // Executor B gets them again, as attempt 2, once the leases expire.
    let mut b = daemon.executor_client().await;
    let mut stream = lease(&mut b, "b", 2).await;
    for _ in 0..2 {
        let again = next_lease(&mut stream).await;
        assert_eq!(again.attempt, 2);
        b.finish(finish("b", &again, SUCCEEDED)).await.unwrap();
    }
    watcher.until_phase("a1", SUCCEEDED).await;
    // A late Finish from the dead executor is stale.
    let status = a.finish(finish("a", &first, SUCCEEDED)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    daemon.stop().await;
}

async fn exhausted_retries_fail_with_a_system_error(db: TestDb) {
    let daemon = Daemon::start_with(&db, |config| {
        short_leases(config);
        config.executor.max_system_retries = 1;
    })
    .await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;

    let mut executor = daemon.executor_client().await;
    let mut attempts = Vec::new();
    for i in 0..2 {
        // A new executor process each time (a new id), which leases "a1"
        // (and the root) and dies.
        let mut stream = lease(&mut executor, &format!("flaky-{i}"), 2).await;
        let mut leased = next_lease(&mut stream).await;
        if name(&leased) != "a1" {
            leased = next_lease(&mut stream).await;
        }
        attempts.push(leased.attempt);
        drop(stream);
        watcher.until_phase("a1", INITIALIZING).await;
        watcher.until(|p| p.get("a1") != Some(&INITIALIZING)).await;
    }
    assert_eq!(attempts, vec![1, 2]);
    let failed = watcher.until_phase("a1", FAILED).await;
    let error = failed.error.expect("a SYSTEM error");
    assert_eq!(error.kind, core::execution_error::ErrorKind::System as i32);
    assert_eq!(error.code, "LeaseExpired");
    daemon.stop().await;
}

async fn abort_of_a_leased_action_reaches_the_executor(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut executor = daemon.executor_client().await;
    let mut stream = lease(&mut executor, "e1", 1).await;
    let leased = next_lease(&mut stream).await;

    let aborted_at = tokio::time::Instant::now();
    client
        .abort(abort("r1", "a0", "operator said stop"))
        .await
        .unwrap();
    let message = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let elapsed = aborted_at.elapsed();
    match message.event {
        Some(lease_response::Event::Cancelled(cancelled)) => {
            assert_eq!(cancelled.action_id, leased.action_id);
            assert_eq!(cancelled.attempt, 1);
            assert_eq!(cancelled.reason, "operator said stop");
        }
        other => panic!("expected a cancellation, got {other:?}"),
    }
    // Pushed on the lease stream at once, not at the next heartbeat or
    // lease expiry; the margin is for a loaded machine.
    assert!(
        elapsed < Duration::from_secs(3),
        "cancellation took {elapsed:?}"
    );

    // The heartbeat reports it too (once), and Finish is refused.
    let beat = executor
        .heartbeat(HeartbeatRequest {
            executor_id: "e1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.cancelled.len(), 1);
    let again = executor
        .heartbeat(HeartbeatRequest {
            executor_id: "e1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.cancelled.is_empty());
    let status = executor
        .finish(finish("e1", &leased, SUCCEEDED))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    daemon.stop().await;
}

async fn an_unsignalled_condition_times_out(db: TestDb) {
    let daemon = Daemon::start_with(&db, short_leases).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut gate = condition("r1", "gate", "a0", core::SimpleType::Boolean);
    if let Some(actionsd::proto::flyteidl2::actions::action::Spec::Condition(c)) =
        gate.action.as_mut().unwrap().spec.as_mut()
    {
        c.timeout = Some(prost_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        });
    }
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    client.enqueue(gate).await.unwrap();
    let update = watcher.until_phase("gate", 8).await;
    let error = update.error.expect("a timeout error");
    assert_eq!(error.code, "ConditionTimedOut");
    let status = client
        .signal(signal(
            "r1",
            "gate",
            "a0",
            core::primitive::Value::Boolean(true),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    daemon.stop().await;
}

async fn max_action_concurrency_caps_leases_per_run(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut root = task("r1", "a0", None);
    // RunSpec.max_action_concurrency (field 13) = 2.
    root.run_spec = bytes::Bytes::from_static(b"\x68\x02");
    client.enqueue(root).await.unwrap();
    for i in 0..20 {
        client
            .enqueue(task("r1", &format!("c{i}"), Some("a0")))
            .await
            .unwrap();
    }
    // Two executors with room for 10 each: the run's limit still wins.
    let running = Arc::new(Mutex::new((0usize, 0usize))); // (now, most)
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut executors = tokio::task::JoinSet::new();
    for e in 0..2 {
        let mut executor = daemon.executor_client().await;
        let running = running.clone();
        let done = done.clone();
        executors.spawn(async move {
            let id = format!("e{e}");
            let mut stream = lease(&mut executor, &id, 10).await;
            // Each leased action runs on its own, as in a real executor.
            let mut running_now = tokio::task::JoinSet::new();
            loop {
                let action = next_lease(&mut stream).await;
                let (running, done, mut executor, id) =
                    (running.clone(), done.clone(), executor.clone(), id.clone());
                running_now.spawn(async move {
                    {
                        let mut running = running.lock().unwrap();
                        running.0 += 1;
                        running.1 = running.1.max(running.0);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    running.lock().unwrap().0 -= 1;
                    executor
                        .finish(finish(&id, &action, SUCCEEDED))
                        .await
                        .unwrap();
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while done.load(std::sync::atomic::Ordering::SeqCst) < 21 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    executors.abort_all();
    let most = running.lock().unwrap().1;
    assert!(most <= 2, "{most} actions of the run were leased at once");
    assert_eq!(most, 2, "the limit allows two at once");
    daemon.stop().await;
}

async fn finish_reports_outputs_and_errors_to_watchers(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "ok", Some("a0"))).await.unwrap();
    client.enqueue(task("r1", "bad", Some("a0"))).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    let mut executor = daemon.executor_client().await;
    let mut stream = lease(&mut executor, "e1", 3).await;
    for _ in 0..3 {
        let leased = next_lease(&mut stream).await;
        assert_eq!(
            leased.output_uri,
            format!("s3://bucket/r1/{}/1", name(&leased))
        );
        let mut request = finish("e1", &leased, SUCCEEDED);
        match name(&leased).as_str() {
            "bad" => {
                request.phase = FAILED;
                request.error = Some(core::ExecutionError {
                    code: "ExitCode1".into(),
                    message: "boom".into(),
                    kind: core::execution_error::ErrorKind::User as i32,
                    ..Default::default()
                });
            }
            "a0" => request.output_uri = "s3://elsewhere/out".into(),
            _ => {}
        }
        executor.finish(request.clone()).await.unwrap();
        // A repeated Finish is a no-op.
        executor.finish(request).await.unwrap();
    }
    let ok = watcher.until_phase("ok", SUCCEEDED).await;
    assert_eq!(ok.output_uri, "s3://bucket/r1/ok/1");
    let bad = watcher.until_phase("bad", FAILED).await;
    assert_eq!(bad.error.unwrap().message, "boom");
    let root = watcher.until_phase("a0", SUCCEEDED).await;
    assert_eq!(root.output_uri, "s3://elsewhere/out");
    daemon.stop().await;
}

async fn a_new_lease_stream_resends_unfinished_leases(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut executor = daemon.executor_client().await;

    // The stream breaks after pushing the lease, but the executor process
    // lives on and heartbeats: the lease stays live.
    let mut stream = lease(&mut executor, "e1", 1).await;
    let first = next_lease(&mut stream).await;
    drop(stream);
    executor
        .heartbeat(HeartbeatRequest {
            executor_id: "e1".into(),
        })
        .await
        .unwrap();

    // Its next stream starts with the lease it holds, not with nothing.
    let mut stream = lease(&mut executor, "e1", 1).await;
    let again = next_lease(&mut stream).await;
    assert_eq!(again.action_id, first.action_id);
    assert_eq!(again.attempt, first.attempt);
    assert_eq!(again.action, first.action);
    executor
        .finish(finish("e1", &again, SUCCEEDED))
        .await
        .unwrap();
    assert_eq!(phases(&mut client, "r1", "a0").await["a0"], SUCCEEDED);
    daemon.stop().await;
}

async fn a_run_at_its_limit_does_not_hide_other_work(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    // r1 may run one action at a time and has a long backlog; r2's work is
    // newer than all of it.
    let mut busy = task("r1", "a0", None);
    busy.run_spec = bytes::Bytes::from_static(b"\x68\x01");
    client.enqueue(busy).await.unwrap();
    for i in 0..60 {
        client
            .enqueue(task("r1", &format!("c{i}"), Some("a0")))
            .await
            .unwrap();
    }
    client.enqueue(task("r2", "a0", None)).await.unwrap();
    client.enqueue(task("r2", "c0", Some("a0"))).await.unwrap();

    let mut executor = daemon.executor_client().await;
    let mut stream = lease(&mut executor, "e1", 5).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let leased = next_lease(&mut stream).await;
        let action = leased.action_id.unwrap();
        got.push(format!("{}/{}", action.run.unwrap().name, action.name));
    }
    got.sort();
    assert_eq!(got, vec!["r1/a0", "r2/a0", "r2/c0"]);
    daemon.stop().await;
}

async fn a_retrying_finish_queues_the_next_attempt(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    let mut executor = daemon.executor_client().await;
    let mut stream = lease(&mut executor, "e", 2).await;
    let mut child = next_lease(&mut stream).await;
    if name(&child) != "a1" {
        child = next_lease(&mut stream).await;
    }
    assert_eq!(child.attempt, 1);
    watcher.until_phase("a1", INITIALIZING).await;

    // Retry is only for FAILED.
    let mut wrong = finish("e", &child, SUCCEEDED);
    wrong.retry = true;
    let status = executor.finish(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("retry"), "{}", status.message());

    let mut failed = finish("e", &child, FAILED);
    failed.retry = true;
    failed.error = Some(core::ExecutionError {
        code: "ValueError".into(),
        message: "first attempt fails".into(),
        kind: core::execution_error::ErrorKind::User as i32,
        ..Default::default()
    });
    executor.finish(failed).await.unwrap();
    let queued = watcher.until_phase("a1", QUEUED).await;
    assert_eq!(
        queued.error.map(|e| e.message).as_deref(),
        Some("first attempt fails")
    );

    // The next attempt is leased and finishes the action.
    let again = next_lease(&mut stream).await;
    assert_eq!((name(&again).as_str(), again.attempt), ("a1", 2));
    executor
        .finish(finish("e", &again, SUCCEEDED))
        .await
        .unwrap();
    let done = watcher.until_phase("a1", SUCCEEDED).await;
    assert!(done.error.is_none());
    // The first attempt is stale now.
    let stale = executor
        .finish(finish("e", &child, FAILED))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    daemon.stop().await;
}

async fn a_parent_waiting_on_children_frees_its_slot_up_to_max_leases(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut executor = daemon.executor_client().await;
    // Capacity 1, at most 3 leases: a chain a0 -> a1 -> a2 -> a3.
    let mut stream = lease_bounded(&mut executor, "e", 1, 3).await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let root = next_lease(&mut stream).await;
    assert_eq!(name(&root), "a0");
    for (parent, child) in [("a0", "a1"), ("a1", "a2")] {
        client
            .enqueue(task("r1", child, Some(parent)))
            .await
            .unwrap();
        let leased = next_lease(&mut stream).await;
        assert_eq!(
            name(&leased),
            child,
            "the waiting parent {parent} frees its slot"
        );
    }
    // Three leases held, all but a2 waiting: the bound holds a3 back.
    client.enqueue(task("r1", "a3", Some("a2"))).await.unwrap();
    let held = tokio::time::timeout(Duration::from_millis(700), stream.message()).await;
    assert!(held.is_err(), "leased past max_leases: {held:?}");
    // The run ends, so that its queued action does not reach the next
    // executor.
    client.abort(abort("r1", "a0", "done")).await.unwrap();
    daemon.stop().await;

    // Without max_leases a waiting parent keeps its slot.
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut executor = daemon.executor_client().await;
    let mut stream = lease(&mut executor, "f", 1).await;
    client.enqueue(task("r2", "a0", None)).await.unwrap();
    assert_eq!(name(&next_lease(&mut stream).await), "a0");
    client.enqueue(task("r2", "a1", Some("a0"))).await.unwrap();
    let held = tokio::time::timeout(Duration::from_millis(700), stream.message()).await;
    assert!(held.is_err(), "leased past the capacity: {held:?}");
    daemon.stop().await;
}

/// A cancellation may reach an executor twice, on the lease stream and in
/// the next heartbeat (executors act on it once per action and attempt);
/// both carry the same reason: the Abort's, or "aborted" when it gave none.
async fn a_cancellation_carries_one_reason_on_the_stream_and_in_the_heartbeat(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut executor = daemon.executor_client().await;
    for (run, reason) in [("r1", None), ("r2", Some("operator said stop"))] {
        client.enqueue(task(run, "a0", None)).await.unwrap();
        let mut stream = lease(&mut executor, &format!("e-{run}"), 1).await;
        let leased = next_lease(&mut stream).await;
        let mut request = abort(run, "a0", "");
        request.reason = reason.map(str::to_owned);
        client.abort(request).await.unwrap();
        let message = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let on_stream = match message.event {
            Some(lease_response::Event::Cancelled(cancelled)) => cancelled,
            other => panic!("expected a cancellation, got {other:?}"),
        };
        let beat = executor
            .heartbeat(HeartbeatRequest {
                executor_id: format!("e-{run}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(beat.cancelled.len(), 1);
        let in_heartbeat = &beat.cancelled[0];
        let expected = reason.unwrap_or("aborted");
        assert_eq!(on_stream.reason, expected);
        assert_eq!(in_heartbeat.reason, expected);
        assert_eq!(in_heartbeat.action_id, leased.action_id);
        assert_eq!(in_heartbeat.attempt, on_stream.attempt);
    }
    daemon.stop().await;
}
