//! ActionsService semantics over real gRPC and a real Postgres: the success
//! path of every RPC and every status code of the contract.

mod common;

conformance!(
    every_rpc_succeeds_on_the_happy_path,
    enqueue_validation_names_the_field,
    enqueue_is_idempotent_and_conflicts_on_different_content,
    enqueue_stores_spec_bytes_and_resolves_queues,
    enqueue_under_missing_or_finished_parent,
    update_rules_and_codes,
    abort_codes,
    abort_cascades_over_three_levels,
    signal_rules_and_codes,
    trace_and_condition_actions,
    watch_codes,
    oversized_requests_are_refused,
    update_status_fields_are_recorded,
);

use actionsd::proto::flyteidl2::actions::{
    AbortRequest, EnqueueRequest, SignalRequest, UpdateRequest, WatchForUpdatesRequest,
};
use actionsd::proto::flyteidl2::core::{self, primitive};
use actionsd::proto::flyteidl2::workflow::ActionStatus;
use common::*;
use prost::Message;
use tonic::Code;

async fn every_rpc_succeeds_on_the_happy_path(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    client
        .enqueue(condition("r1", "gate", "a0", core::SimpleType::Boolean))
        .await
        .unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    assert_eq!(watcher.phases.get("a0"), Some(&QUEUED));
    assert_eq!(watcher.phases.get("a1"), Some(&QUEUED));
    assert_eq!(watcher.phases.get("gate"), Some(&PAUSED));

    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    watcher.until_phase("a1", RUNNING).await;
    client
        .signal(signal("r1", "gate", "a0", primitive::Value::Boolean(true)))
        .await
        .unwrap();
    let signalled = watcher.until_phase("gate", SUCCEEDED).await;
    assert_eq!(
        signalled.value,
        Some(primitive_literal(primitive::Value::Boolean(true)))
    );
    client.abort(abort("r1", "a1", "not needed")).await.unwrap();
    let aborted = watcher.until_phase("a1", ABORTED).await;
    let error = aborted.error.expect("an aborted action reports why");
    assert_eq!(error.message, "not needed");

    daemon.stop().await;
}

/// A change that makes an Enqueue invalid.
type Mutation = Box<dyn Fn(&mut EnqueueRequest)>;

async fn enqueue_validation_names_the_field(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    let msg = expect_code(
        client.enqueue(EnqueueRequest::default()).await,
        Code::InvalidArgument,
    );
    assert_eq!(msg, "action: is required");

    let cases: Vec<(&str, Mutation)> = vec![
        (
            "action.action_id",
            Box::new(|r| r.action.as_mut().unwrap().action_id = None),
        ),
        (
            "action.action_id.run",
            Box::new(|r| r.action.as_mut().unwrap().action_id.as_mut().unwrap().run = None),
        ),
        (
            "action.action_id.run.project",
            Box::new(|r| {
                let id = r.action.as_mut().unwrap().action_id.as_mut().unwrap();
                id.run.as_mut().unwrap().project.clear();
            }),
        ),
        (
            "action.action_id.run.domain",
            Box::new(|r| {
                let id = r.action.as_mut().unwrap().action_id.as_mut().unwrap();
                id.run.as_mut().unwrap().domain.clear();
            }),
        ),
        (
            "action.action_id.run.name",
            Box::new(|r| {
                let id = r.action.as_mut().unwrap().action_id.as_mut().unwrap();
                id.run.as_mut().unwrap().name = "r".repeat(31);
            }),
        ),
        (
            "action.action_id.run.org",
            Box::new(|r| {
                let id = r.action.as_mut().unwrap().action_id.as_mut().unwrap();
                id.run.as_mut().unwrap().org = "o".repeat(64);
            }),
        ),
        (
            "action.action_id.name",
            Box::new(|r| {
                r.action.as_mut().unwrap().action_id.as_mut().unwrap().name = "n".repeat(31)
            }),
        ),
        (
            "action.input_uri",
            Box::new(|r| r.action.as_mut().unwrap().input_uri.clear()),
        ),
        (
            "action.run_output_base",
            Box::new(|r| r.action.as_mut().unwrap().run_output_base.clear()),
        ),
        (
            "action.spec",
            Box::new(|r| r.action.as_mut().unwrap().spec = None),
        ),
        (
            "action.recovered_from",
            Box::new(|r| r.action.as_mut().unwrap().recovered_from = Some(aid("r0", "a0"))),
        ),
        (
            "run_spec",
            Box::new(|r| r.run_spec = bytes::Bytes::from_static(b"\xff\xff\xff")),
        ),
    ];
    for (field, mutate) in cases {
        let mut request = task("r1", "a0", None);
        mutate(&mut request);
        let msg = expect_code(client.enqueue(request).await, Code::InvalidArgument);
        assert!(msg.starts_with(&format!("{field}: ")), "{field}: got {msg}");
    }
    // An empty org is allowed (open-source deployments leave it blank), and
    // nothing of the refused requests was written.
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    assert_eq!(phases(&mut client, "r1", "a0").await.len(), 1);

    daemon.stop().await;
}

async fn enqueue_is_idempotent_and_conflicts_on_different_content(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    let mut root = task("r1", "a0", None);
    // RunSpec with queue (6) = "gpu".
    root.run_spec = bytes::Bytes::from_static(b"\x32\x03gpu");
    client.enqueue(root.clone()).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();

    // The same content again: OK, and nothing changes (still RUNNING).
    client.enqueue(root.clone()).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    assert_eq!(phases(&mut client, "r1", "a0").await["a1"], RUNNING);

    // Different content under the same id.
    let mut different = task("r1", "a1", Some("a0"));
    different.action.as_mut().unwrap().input_uri = "s3://elsewhere".into();
    let msg = expect_code(client.enqueue(different).await, Code::AlreadyExists);
    assert!(msg.contains("a1"), "{msg}");
    // An explicitly empty parent name means root, like an absent one.
    let mut empty_parent = root.clone();
    empty_parent.action.as_mut().unwrap().parent_action_name = Some(String::new());
    client.enqueue(empty_parent).await.unwrap();
    // Same root action, different RunSpec.
    let mut other_spec = root.clone();
    other_spec.run_spec = bytes::Bytes::from_static(b"\x32\x03cpu");
    expect_code(client.enqueue(other_spec).await, Code::AlreadyExists);
    // A second root in the same run.
    let msg = expect_code(
        client.enqueue(task("r1", "b0", None)).await,
        Code::AlreadyExists,
    );
    assert!(msg.contains("root action 'a0'"), "{msg}");

    // Concurrent identical enqueues: all succeed, one action exists.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            c.enqueue(task("r1", "same", Some("a0"))).await
        }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let count = rows!(
        db,
        (i64,),
        "SELECT count(*) FROM events WHERE name = 'same'"
    );
    assert_eq!(count, vec![(1,)]);

    daemon.stop().await;
}

async fn enqueue_stores_spec_bytes_and_resolves_queues(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    let mut root = task("r1", "a0", None);
    root.run_spec = bytes::Bytes::from_static(b"\x32\x03gpu\x68\x04");
    client.enqueue(root.clone()).await.unwrap();
    let mut own_queue = task("r1", "a1", Some("a0"));
    if let Some(actionsd::proto::flyteidl2::actions::action::Spec::Task(t)) =
        own_queue.action.as_mut().unwrap().spec.as_mut()
    {
        t.queue = "fast".into();
    }
    client.enqueue(own_queue).await.unwrap();
    client.enqueue(task("r1", "a2", Some("a0"))).await.unwrap();
    client.enqueue(task("r2", "a0", None)).await.unwrap();

    let queues = rows!(
        db,
        (String, String, Option<String>),
        "SELECT run_name, name, queue FROM actions ORDER BY run_name, name"
    );
    let queues: Vec<(&str, &str, Option<&str>)> = queues
        .iter()
        .map(|(r, n, q)| (r.as_str(), n.as_str(), q.as_deref()))
        .collect();
    assert_eq!(
        queues,
        vec![
            ("r1", "a0", Some("gpu")),
            ("r1", "a1", Some("fast")),
            ("r1", "a2", Some("gpu")),
            ("r2", "a0", Some("default")),
        ]
    );

    let (spec, run_spec) = rows!(
        db,
        (Vec<u8>, Vec<u8>),
        "SELECT a.spec, r.run_spec FROM actions a JOIN runs r ON r.name = a.run_name \
         WHERE a.run_name = 'r1' AND a.name = 'a0'"
    )
    .remove(0);
    assert_eq!(spec, root.action.as_ref().unwrap().encode_to_vec());
    assert_eq!(run_spec, root.run_spec.to_vec());

    daemon.stop().await;
}

async fn enqueue_under_missing_or_finished_parent(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    let msg = expect_code(
        client.enqueue(task("r1", "a1", Some("a0"))).await,
        Code::NotFound,
    );
    assert!(msg.contains("parent action"), "{msg}");

    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    client
        .update(status_update("r1", "a1", 1, FAILED))
        .await
        .unwrap();
    // Parent terminal: ABORTED ("run was aborted"), never FAILED_PRECONDITION.
    let msg = expect_code(
        client.enqueue(task("r1", "a2", Some("a1"))).await,
        Code::Aborted,
    );
    assert!(msg.contains("run was aborted"), "{msg}");
    client.abort(abort("r1", "a0", "stop")).await.unwrap();
    expect_code(
        client.enqueue(task("r1", "late", Some("a0"))).await,
        Code::Aborted,
    );

    daemon.stop().await;
}

async fn update_rules_and_codes(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();

    expect_code(
        client.update(status_update("r1", "nope", 1, RUNNING)).await,
        Code::NotFound,
    );
    let msg = expect_code(
        client.update(status_update("r1", "a1", 0, RUNNING)).await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("attempt: "), "{msg}");
    let msg = expect_code(
        client
            .update(UpdateRequest {
                status: None,
                ..status_update("r1", "a1", 1, RUNNING)
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("status: "), "{msg}");
    let msg = expect_code(
        client.update(status_update("r1", "a1", 1, 0)).await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("status.phase: "), "{msg}");
    let msg = expect_code(
        client
            .update(UpdateRequest {
                action_id: None,
                ..status_update("r1", "a1", 1, RUNNING)
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("action_id: "), "{msg}");

    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    // Backwards within an attempt.
    expect_code(
        client
            .update(status_update("r1", "a1", 1, INITIALIZING))
            .await,
        Code::FailedPrecondition,
    );
    // An update that changes nothing: OK, no event.
    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    // A new attempt begins; the old one is stale from now on.
    client
        .update(status_update("r1", "a1", 2, QUEUED))
        .await
        .unwrap();
    let msg = expect_code(
        client.update(status_update("r1", "a1", 1, SUCCEEDED)).await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("stale attempt"), "{msg}");
    client
        .update(status_update("r1", "a1", 2, SUCCEEDED))
        .await
        .unwrap();
    // Repeating the terminal update is OK; anything else is refused.
    client
        .update(status_update("r1", "a1", 2, SUCCEEDED))
        .await
        .unwrap();
    expect_code(
        client.update(status_update("r1", "a1", 2, FAILED)).await,
        Code::FailedPrecondition,
    );
    expect_code(
        client.update(status_update("r1", "a1", 3, RUNNING)).await,
        Code::FailedPrecondition,
    );

    let versions = rows!(
        db,
        (i64, i16, i64),
        "SELECT version, phase, attempt FROM events WHERE name = 'a1' ORDER BY version"
    );
    assert_eq!(
        versions,
        vec![(1, 1, 1), (2, 4, 1), (3, 1, 2), (4, 5, 2)],
        "one event per accepted change, none for no-ops or refusals"
    );

    daemon.stop().await;
}

async fn abort_codes(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();

    expect_code(client.abort(abort("r1", "zz", "x")).await, Code::NotFound);
    let msg = expect_code(
        client.abort(AbortRequest::default()).await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("action_id: "), "{msg}");
    client
        .update(status_update("r1", "a1", 1, SUCCEEDED))
        .await
        .unwrap();
    expect_code(
        client.abort(abort("r1", "a1", "late")).await,
        Code::FailedPrecondition,
    );
    client.abort(abort("r1", "a0", "done")).await.unwrap();
    expect_code(
        client.abort(abort("r1", "a0", "again")).await,
        Code::FailedPrecondition,
    );

    daemon.stop().await;
}

async fn abort_cascades_over_three_levels(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    // a0 → a1 → a2 → a3, plus finished and running siblings along the way.
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    client
        .enqueue(task("r1", "keep", Some("a0")))
        .await
        .unwrap();
    client.enqueue(task("r1", "a2", Some("a1"))).await.unwrap();
    client
        .enqueue(task("r1", "done", Some("a1")))
        .await
        .unwrap();
    client.enqueue(task("r1", "a3", Some("a2"))).await.unwrap();
    client
        .enqueue(task("r1", "under_done", Some("done")))
        .await
        .unwrap();
    client
        .update(status_update("r1", "a3", 1, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("r1", "done", 1, SUCCEEDED))
        .await
        .unwrap();

    let mut watcher = Watcher::open(&mut client, "r1", "a1").await;
    client
        .abort(AbortRequest {
            action_id: Some(aid("r1", "a1")),
            reason: Some("user cancelled".into()),
            aborted_by: None,
        })
        .await
        .unwrap();
    watcher.until_phase("a1", ABORTED).await;
    watcher.until_phase("a2", ABORTED).await;

    assert_eq!(phases(&mut client, "r1", "a2").await["a3"], ABORTED);
    let level1 = phases(&mut client, "r1", "a1").await;
    assert_eq!(
        level1["done"], SUCCEEDED,
        "terminal descendants keep their phase"
    );
    assert_eq!(
        phases(&mut client, "r1", "done").await["under_done"],
        ABORTED
    );
    let top = phases(&mut client, "r1", "a0").await;
    assert_eq!(top["a0"], QUEUED, "the abort does not go up");
    assert_eq!(top["keep"], QUEUED, "nor sideways");

    let reasons = rows!(
        db,
        (String, Option<String>),
        "SELECT name, abort_reason FROM actions WHERE phase = 7 ORDER BY name"
    );
    assert_eq!(reasons.len(), 4);
    assert!(reasons
        .iter()
        .all(|(_, r)| r.as_deref() == Some("user cancelled")));

    daemon.stop().await;
}

async fn signal_rules_and_codes(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "t1", Some("a0"))).await.unwrap();
    client
        .enqueue(condition("r1", "approve", "a0", core::SimpleType::Boolean))
        .await
        .unwrap();
    client
        .enqueue(condition("r1", "count", "a0", core::SimpleType::Integer))
        .await
        .unwrap();

    let yes = || primitive::Value::Boolean(true);
    expect_code(
        client.signal(signal("r1", "nope", "a0", yes())).await,
        Code::NotFound,
    );
    let msg = expect_code(
        client.signal(signal("r1", "t1", "a0", yes())).await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("only condition actions"), "{msg}");
    // Type mismatch: an integer for a boolean condition.
    let msg = expect_code(
        client
            .signal(signal("r1", "approve", "a0", primitive::Value::Integer(1)))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        msg.starts_with("value: ") && msg.contains("BOOLEAN"),
        "{msg}"
    );
    let msg = expect_code(
        client
            .signal(SignalRequest {
                value: None,
                ..signal("r1", "approve", "a0", yes())
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("value: "), "{msg}");
    let msg = expect_code(
        client
            .signal(SignalRequest {
                value: Some(core::Literal {
                    value: Some(core::literal::Value::Collection(bytes::Bytes::new())),
                    ..Default::default()
                }),
                ..signal("r1", "approve", "a0", yes())
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.contains("primitive"), "{msg}");
    let msg = expect_code(
        client.signal(signal("r1", "approve", "", yes())).await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("parent_action_name: "), "{msg}");

    client
        .signal(signal("r1", "approve", "a0", yes()))
        .await
        .unwrap();
    // The same value again: OK.
    client
        .signal(signal("r1", "approve", "a0", yes()))
        .await
        .unwrap();
    // A different value after resolution.
    expect_code(
        client
            .signal(signal(
                "r1",
                "approve",
                "a0",
                primitive::Value::Boolean(false),
            ))
            .await,
        Code::FailedPrecondition,
    );
    client
        .signal(signal("r1", "count", "a0", primitive::Value::Integer(3)))
        .await
        .unwrap();
    // A terminal (aborted) condition cannot be signalled.
    client
        .enqueue(condition("r1", "late", "a0", core::SimpleType::String))
        .await
        .unwrap();
    client.abort(abort("r1", "late", "no")).await.unwrap();
    expect_code(
        client
            .signal(signal(
                "r1",
                "late",
                "a0",
                primitive::Value::StringValue("x".into()),
            ))
            .await,
        Code::FailedPrecondition,
    );

    let events = rows!(
        db,
        (i64,),
        "SELECT count(*) FROM events WHERE name = 'approve'"
    )[0]
    .0;
    assert_eq!(
        events, 2,
        "enqueue + one resolution; the repeat wrote nothing"
    );
    daemon.stop().await;
}

async fn trace_and_condition_actions(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;

    // A trace without a phase is SUCCEEDED, with its outputs' URI.
    client
        .enqueue(trace("r1", "tr1", "a0", 0, "s3://out/tr1"))
        .await
        .unwrap();
    let update = watcher.until_phase("tr1", SUCCEEDED).await;
    assert_eq!(update.output_uri, "s3://out/tr1");
    // A trace carrying its own phase keeps it.
    client
        .enqueue(trace("r1", "tr2", "a0", FAILED, "s3://out/tr2"))
        .await
        .unwrap();
    watcher.until_phase("tr2", FAILED).await;
    // A finished trace is final like any terminal action ...
    expect_code(
        client.update(status_update("r1", "tr1", 1, RUNNING)).await,
        Code::FailedPrecondition,
    );
    // ... and a trace recorded while running is finished by an Update.
    client
        .enqueue(trace("r1", "tr3", "a0", RUNNING, "s3://out/tr3"))
        .await
        .unwrap();
    watcher.until_phase("tr3", RUNNING).await;
    client
        .update(status_update("r1", "tr3", 1, SUCCEEDED))
        .await
        .unwrap();
    watcher.until_phase("tr3", SUCCEEDED).await;
    // Conditions are resolved by Signal only.
    client
        .enqueue(condition("r1", "gate", "a0", core::SimpleType::Boolean))
        .await
        .unwrap();
    let msg = expect_code(
        client
            .update(status_update("r1", "gate", 1, SUCCEEDED))
            .await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("resolved by Signal"), "{msg}");

    // A condition waits (PAUSED) until signalled; the value reaches watchers.
    client
        .enqueue(condition("r1", "ask", "a0", core::SimpleType::String))
        .await
        .unwrap();
    watcher.until_phase("ask", PAUSED).await;
    client
        .signal(signal(
            "r1",
            "ask",
            "a0",
            primitive::Value::StringValue("ship it".into()),
        ))
        .await
        .unwrap();
    let update = watcher.until_phase("ask", SUCCEEDED).await;
    assert_eq!(
        update.value,
        Some(primitive_literal(primitive::Value::StringValue(
            "ship it".into()
        )))
    );

    // A condition's timeout is recorded as its deadline.
    let mut timed = condition("r1", "timed", "a0", core::SimpleType::Boolean);
    if let Some(actionsd::proto::flyteidl2::actions::action::Spec::Condition(c)) =
        timed.action.as_mut().unwrap().spec.as_mut()
    {
        c.timeout = Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        });
    }
    client.enqueue(timed).await.unwrap();
    let deadlines = rows!(
        db,
        (String, bool),
        "SELECT name, deadline IS NOT NULL FROM actions WHERE kind = 3 ORDER BY name"
    );
    assert_eq!(
        deadlines,
        vec![
            ("ask".to_owned(), false),
            ("gate".to_owned(), false),
            ("timed".to_owned(), true)
        ]
    );
    if let TestDb::Postgres(pool) = &db {
        let in_an_hour: bool = sqlx::query_scalar(
            "SELECT deadline > now() + interval '59 minutes' FROM actions WHERE name = 'timed'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(in_an_hour);
    }
    daemon.stop().await;
}

async fn watch_codes(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let msg = expect_code(
        client
            .watch_for_updates(WatchForUpdatesRequest { filter: None })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("parent_action_id: "), "{msg}");
    expect_code(
        client.watch_for_updates(watch_request("r1", "a0")).await,
        Code::NotFound,
    );
    daemon.stop().await;
}

async fn oversized_requests_are_refused(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut request = task("r1", "a0", None);
    request.action.as_mut().unwrap().input_uri = "x".repeat(5 * 1024 * 1024);
    let status = client.enqueue(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Nothing was written, and the daemon still serves.
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    assert_eq!(phases(&mut client, "r1", "a0").await.len(), 1);
    daemon.stop().await;
}

async fn update_status_fields_are_recorded(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut request = status_update("r1", "a0", 1, RUNNING);
    request.status = Some(ActionStatus {
        start_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        ..request.status.unwrap()
    });
    client.update(request).await.unwrap();
    let recorded = rows!(
        db,
        (bool,),
        "SELECT start_time IS NOT NULL FROM actions WHERE name = 'a0'"
    );
    assert_eq!(recorded, vec![(true,)]);
    // The exact instant, where the dialect lets the test read it back.
    if let TestDb::Postgres(pool) = &db {
        let started: i64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM start_time)::bigint FROM actions WHERE name = 'a0'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(started, 1_800_000_000);
    }
    daemon.stop().await;
}
