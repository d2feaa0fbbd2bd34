//! Hostile input and the limits that stop it, on both stores: times and
//! durations, identifiers, attempts, free text, and what every update
//! carries (output location, address).

mod common;

conformance!(
    times_and_durations_outside_the_range_are_refused,
    a_row_holding_an_unreadable_time_fails_only_its_own_reads,
    identifiers_with_control_characters_or_slashes_are_refused,
    attempts_above_2_31_are_stored_whole_and_stay_ordered,
    free_text_over_its_limit_is_refused,
    every_task_update_carries_its_output_location,
    the_latest_address_reaches_watchers_and_snapshots,
    listing_pages_and_snapshots_are_bounded_in_bytes,
);

use actionsd::proto::actionsd::read::v1::{
    read_service_client::ReadServiceClient, GetActionRequest, ListActionsRequest,
};
use actionsd::proto::flyteidl2::actions::action;
use actionsd::proto::flyteidl2::common::{ActionAddress, PodAddress};
use actionsd::proto::flyteidl2::core;
use common::*;
use tonic::Code;

async fn reader(daemon: &Daemon) -> ReadServiceClient<tonic::transport::Channel> {
    ReadServiceClient::connect(format!("http://{}", daemon.addr))
        .await
        .expect("connects")
}

fn with_timeout(
    mut request: actionsd::proto::flyteidl2::actions::EnqueueRequest,
    seconds: i64,
) -> actionsd::proto::flyteidl2::actions::EnqueueRequest {
    if let Some(action::Spec::Condition(c)) = request.action.as_mut().unwrap().spec.as_mut() {
        c.timeout = Some(prost_types::Duration { seconds, nanos: 0 });
    }
    request
}

fn stamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// A condition timeout of 9,000,000,000,000 s used to be stored, and every
/// later read of the run panicked (Postgres) or failed (SQLite). Now it is
/// INVALID_ARGUMENT naming the field, nothing is written, and the run reads
/// normally; the same holds for times an executor reports.
async fn times_and_durations_outside_the_range_are_refused(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;
    client.enqueue(task("t1", "a0", None)).await.unwrap();

    let huge = with_timeout(
        condition("t1", "c2", "a0", core::SimpleType::Boolean),
        9_000_000_000_000,
    );
    let message = expect_code(client.enqueue(huge).await, Code::InvalidArgument);
    assert!(
        message.starts_with("action.condition.timeout: is 9000000000000 s"),
        "{message}"
    );
    let negative = with_timeout(condition("t1", "c3", "a0", core::SimpleType::Boolean), -5);
    let message = expect_code(client.enqueue(negative).await, Code::InvalidArgument);
    assert!(message.starts_with("action.condition.timeout"), "{message}");
    // The longest accepted timeout (100 years) is stored and read back.
    let longest = with_timeout(
        condition("t1", "c4", "a0", core::SimpleType::Boolean),
        3_155_760_000,
    );
    client.enqueue(longest).await.unwrap();

    // Year 10000 and year 0 are outside the protobuf Timestamp range.
    for (field, seconds) in [
        ("status.end_time", 253_402_300_800),
        ("status.start_time", -62_135_596_801),
    ] {
        let mut update = status_update("t1", "a0", 1, RUNNING);
        let status = update.status.as_mut().unwrap();
        if field == "status.end_time" {
            status.end_time = Some(stamp(seconds));
        } else {
            status.start_time = Some(stamp(seconds));
        }
        let message = expect_code(client.update(update).await, Code::InvalidArgument);
        assert!(message.starts_with(field), "{message}");
    }

    // Nothing of the refused requests was written; every read works.
    let listed = reader
        .list_actions(ListActionsRequest {
            run: Some(run_id("t1")),
            ..Default::default()
        })
        .await
        .expect("the run lists")
        .into_inner();
    let names: Vec<_> = listed
        .actions
        .iter()
        .map(|a| a.id.clone().unwrap().name)
        .collect();
    assert_eq!(names, ["a0", "c4"]);
    assert_eq!(listed.actions[0].phase, QUEUED);
    let c4 = reader
        .get_action(GetActionRequest {
            id: Some(aid("t1", "c4")),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let deadline = c4.deadline.expect("a deadline").seconds;
    let expected = chrono::Utc::now().timestamp() + 3_155_760_000;
    assert!((deadline - expected).abs() < 60, "{deadline} vs {expected}");
    let snapshot = snapshot(&mut client, "t1", "a0").await;
    assert_eq!(snapshot.len(), 2);
    daemon.stop().await;
}

/// A time the store holds but chrono cannot represent (written before the
/// edge checked, or by hand) fails the reads of that action with INTERNAL;
/// the daemon keeps serving, and other runs read normally.
async fn a_row_holding_an_unreadable_time_fails_only_its_own_reads(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;
    client.enqueue(task("bad", "a0", None)).await.unwrap();
    client
        .enqueue(condition("bad", "c1", "a0", core::SimpleType::Boolean))
        .await
        .unwrap();
    client.enqueue(task("good", "a0", None)).await.unwrap();
    match &db {
        // Past chrono's range (year 262143), within Postgres's (294276).
        TestDb::Postgres(pool) => {
            sqlx::query(
                "UPDATE actions SET deadline = '280000-01-01 00:00:00+00' WHERE name = 'c1'",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        TestDb::Sqlite { pool, .. } => {
            sqlx::query("UPDATE actions SET deadline = 9223372036854775807 WHERE name = 'c1'")
                .execute(pool)
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        let message = expect_code(
            reader
                .get_action(GetActionRequest {
                    id: Some(aid("bad", "c1")),
                })
                .await,
            Code::Internal,
        );
        assert!(!message.is_empty());
        expect_code(
            reader
                .list_actions(ListActionsRequest {
                    run: Some(run_id("bad")),
                    ..Default::default()
                })
                .await,
            Code::Internal,
        );
    }
    // The daemon is still up, and the other run reads.
    let good = reader
        .get_action(GetActionRequest {
            id: Some(aid("good", "a0")),
        })
        .await
        .expect("another run reads")
        .into_inner();
    assert_eq!(good.action.unwrap().phase, QUEUED);
    client
        .enqueue(task("after", "a0", None))
        .await
        .expect("writes still work");
    daemon.stop().await;
}

/// A NUL byte in an id gave INTERNAL on Postgres and was stored by SQLite;
/// `/` printed ambiguously. Both are refused by one rule, naming the field.
async fn identifiers_with_control_characters_or_slashes_are_refused(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let cases: [(&str, Spoil); 5] = [
        ("action.action_id.run.name", |id| {
            id.run.as_mut().unwrap().name = "r\0x".into()
        }),
        ("action.action_id.name", |id| {
            id.name = "a\n[INFO] forged".into()
        }),
        ("action.action_id.run.project", |id| {
            id.run.as_mut().unwrap().project = "p/d".into()
        }),
        ("action.action_id.run.domain", |id| {
            id.run.as_mut().unwrap().domain = "\u{1b}[31m".into()
        }),
        ("action.action_id.run.org", |id| {
            id.run.as_mut().unwrap().org = "o\u{7f}".into()
        }),
    ];
    for (field, spoil) in cases {
        let mut request = task("ids", "a0", None);
        spoil(request.action.as_mut().unwrap().action_id.as_mut().unwrap());
        let message = expect_code(client.enqueue(request).await, Code::InvalidArgument);
        assert!(
            message.starts_with(&format!("{field}: must not contain")),
            "{message}"
        );
    }
    let mut child = task("ids", "a1", Some("a0"));
    child.action.as_mut().unwrap().parent_action_name = Some("a\0".into());
    let message = expect_code(client.enqueue(child).await, Code::InvalidArgument);
    assert!(
        message.starts_with("action.parent_action_name"),
        "{message}"
    );
    // Other requests share the rule.
    let mut abort = abort("ids", "a0", "");
    abort.action_id.as_mut().unwrap().name = "a\0".into();
    let message = expect_code(client.abort(abort).await, Code::InvalidArgument);
    assert!(message.starts_with("action_id.name"), "{message}");
    // Unicode, spaces and punctuation other than '/' are allowed.
    client
        .enqueue(task("ïds-1.x", "a0 b:c", None))
        .await
        .unwrap();

    let stored: Vec<(String,)> = rows!(db, (String,), "SELECT run_name FROM actions");
    assert_eq!(stored, [("ïds-1.x".to_owned(),)]);
    daemon.stop().await;
}

/// Attempt 4294967295 was stored as 2147483647, so a later stale attempt
/// 3000000000 was accepted and moved the action backwards.
async fn attempts_above_2_31_are_stored_whole_and_stay_ordered(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;
    client.enqueue(task("at", "a0", None)).await.unwrap();
    client.enqueue(task("at", "a1", Some("a0"))).await.unwrap();

    client
        .update(status_update("at", "a1", 3_000_000_000, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("at", "a1", u32::MAX, RUNNING))
        .await
        .unwrap();
    let message = expect_code(
        client
            .update(status_update("at", "a1", 3_000_000_000, QUEUED))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("stale attempt 3000000000"), "{message}");
    assert!(
        message.contains("current attempt is 4294967295"),
        "{message}"
    );
    // Same attempt, an earlier phase: refused too.
    expect_code(
        client
            .update(status_update("at", "a1", u32::MAX, QUEUED))
            .await,
        Code::FailedPrecondition,
    );
    let got = reader
        .get_action(GetActionRequest {
            id: Some(aid("at", "a1")),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!((got.attempt, got.phase), (u32::MAX, RUNNING));
    let stored: Vec<(i64,)> = rows!(
        db,
        (i64,),
        "SELECT attempt FROM events WHERE name = 'a1' ORDER BY version"
    );
    assert_eq!(stored, [(1,), (3_000_000_000,), (4_294_967_295,)]);
    // The output location follows the attempt.
    let update = snapshot(&mut client, "at", "a0")
        .await
        .into_iter()
        .find(|u| u.action_id.as_ref().unwrap().name == "a1")
        .unwrap();
    assert_eq!(update.output_uri, "s3://bucket/at/a1/4294967295");
    daemon.stop().await;
}

/// One 3 MB abort reason on a parent with 50 children grew the database by
/// hundreds of MB; free text is now bounded at the edge.
async fn free_text_over_its_limit_is_refused(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("ft", "a0", None)).await.unwrap();
    client.enqueue(task("ft", "a1", Some("a0"))).await.unwrap();

    let message = expect_code(
        client.abort(abort("ft", "a0", &"x".repeat(1025))).await,
        Code::InvalidArgument,
    );
    assert_eq!(message, "reason: is 1025 bytes long; the limit is 1024");
    let mut prompt = condition("ft", "c1", "a0", core::SimpleType::Boolean);
    if let Some(action::Spec::Condition(c)) = prompt.action.as_mut().unwrap().spec.as_mut() {
        c.prompt = "?".repeat(16 * 1024 + 1);
    }
    let message = expect_code(client.enqueue(prompt).await, Code::InvalidArgument);
    assert!(
        message.starts_with("action.condition.prompt: is 16385 bytes"),
        "{message}"
    );
    let mut uri = task("ft", "a2", Some("a0"));
    uri.action.as_mut().unwrap().run_output_base = format!("s3://{}", "b".repeat(2048));
    let message = expect_code(client.enqueue(uri).await, Code::InvalidArgument);
    assert!(
        message.starts_with("action.run_output_base: is 2053 bytes"),
        "{message}"
    );

    // At the limit it is accepted, and the abort reached the child.
    client
        .abort(abort("ft", "a0", &"x".repeat(1024)))
        .await
        .unwrap();
    let phases = phases(&mut client, "ft", "a0").await;
    assert_eq!(phases["a1"], ABORTED);
    let reasons: Vec<(Option<String>,)> = rows!(
        db,
        (Option<String>,),
        "SELECT abort_reason FROM actions ORDER BY name"
    );
    assert!(reasons
        .iter()
        .all(|(r,)| r.as_deref().map(str::len) == Some(1024)));
    daemon.stop().await;
}

/// Every ActionUpdate of a task action, snapshot or live, whatever the phase
/// and however it was reported, carries `<run_output_base>/<name>/<attempt>`
/// (the Flyte SDK loads a child's outputs from it).
async fn every_task_update_carries_its_output_location(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("ou", "a0", None)).await.unwrap();
    client.enqueue(task("ou", "a1", Some("a0"))).await.unwrap();
    client
        .enqueue(trace("ou", "t1", "a0", SUCCEEDED, "s3://out/t1"))
        .await
        .unwrap();

    let mut watcher = Watcher::open(&mut client, "ou", "a0").await;
    let uri = |w: &Watcher, name: &str| -> Vec<(i32, String)> {
        w.updates
            .iter()
            .filter(|u| u.action_id.as_ref().unwrap().name == name)
            .map(|u| (u.phase, u.output_uri.clone()))
            .collect()
    };
    assert_eq!(
        uri(&watcher, "a0"),
        [(QUEUED, "s3://bucket/ou/a0/1".to_owned())]
    );
    assert_eq!(
        uri(&watcher, "a1"),
        [(QUEUED, "s3://bucket/ou/a1/1".to_owned())]
    );
    assert_eq!(uri(&watcher, "t1"), [(SUCCEEDED, "s3://out/t1".to_owned())]);

    client
        .update(status_update("ou", "a1", 1, RUNNING))
        .await
        .unwrap();
    watcher.until_phase("a1", RUNNING).await;
    client
        .update(status_update("ou", "a1", 2, QUEUED))
        .await
        .unwrap();
    watcher.until_phase("a1", QUEUED).await;
    client
        .update(status_update("ou", "a1", 2, SUCCEEDED))
        .await
        .unwrap();
    watcher.until_phase("a1", SUCCEEDED).await;
    assert_eq!(
        uri(&watcher, "a1"),
        [
            (QUEUED, "s3://bucket/ou/a1/1".to_owned()),
            (RUNNING, "s3://bucket/ou/a1/1".to_owned()),
            (QUEUED, "s3://bucket/ou/a1/2".to_owned()),
            (SUCCEEDED, "s3://bucket/ou/a1/2".to_owned()),
        ]
    );
    // A fresh snapshot says the same.
    let again = snapshot(&mut client, "ou", "a0").await;
    let a1 = again
        .iter()
        .find(|u| u.action_id.as_ref().unwrap().name == "a1")
        .unwrap();
    assert_eq!(
        (a1.phase, a1.output_uri.as_str()),
        (SUCCEEDED, "s3://bucket/ou/a1/2")
    );
    daemon.stop().await;
}

/// Makes one part of an identifier invalid.
type Spoil = fn(&mut actionsd::proto::flyteidl2::common::ActionIdentifier);

fn address(pod: &str, url: &str) -> ActionAddress {
    ActionAddress {
        pod: Some(PodAddress {
            namespace: "flytesnacks-development".into(),
            name: pod.into(),
            ip: "10.0.0.7".into(),
            port: 8080,
        }),
        path: "/logs".into(),
        url: url.into(),
        cluster: "c1".into(),
    }
}

/// UpdateRequest.address (flyteidl2 >= 2.0.52): the latest one is kept per
/// action and reaches watchers, live and in snapshots; an update without
/// one keeps it; a new address alone is a change.
async fn the_latest_address_reaches_watchers_and_snapshots(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("ad", "a0", None)).await.unwrap();
    client.enqueue(task("ad", "a1", Some("a0"))).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "ad", "a0").await;
    assert_eq!(watcher.updates[1].address, None);

    let mut running = status_update("ad", "a1", 1, RUNNING);
    running.address = Some(address("pod-1", "http://pod-1"));
    client.update(running).await.unwrap();
    let update = watcher.until_phase("a1", RUNNING).await;
    assert_eq!(update.address, Some(address("pod-1", "http://pod-1")));

    // Same phase, a new address: one more update carrying it.
    let mut moved = status_update("ad", "a1", 1, RUNNING);
    moved.address = Some(address("pod-2", "http://pod-2"));
    client.update(moved.clone()).await.unwrap();
    while watcher.updates.last().unwrap().address != Some(address("pod-2", "http://pod-2")) {
        watcher.next().await;
    }
    // Repeating it changes nothing (no event).
    client.update(moved).await.unwrap();
    client
        .update(status_update("ad", "a1", 1, SUCCEEDED))
        .await
        .unwrap();
    let done = watcher.until_phase("a1", SUCCEEDED).await;
    assert_eq!(done.address, Some(address("pod-2", "http://pod-2")));
    let versions: Vec<(i64,)> = rows!(
        db,
        (i64,),
        "SELECT version FROM events WHERE name = 'a1' ORDER BY version"
    );
    assert_eq!(versions, [(1,), (2,), (3,), (4,)]);

    let again = snapshot(&mut client, "ad", "a0").await;
    let a1 = again
        .iter()
        .find(|u| u.action_id.as_ref().unwrap().name == "a1")
        .unwrap();
    assert_eq!(a1.address, Some(address("pod-2", "http://pod-2")));

    let mut long = status_update("ad", "a0", 1, RUNNING);
    long.address = Some(address("p", &"u".repeat(2049)));
    let message = expect_code(client.update(long).await, Code::InvalidArgument);
    assert!(
        message.starts_with("address.url: is 2049 bytes"),
        "{message}"
    );
    daemon.stop().await;
}

/// 70 conditions each holding a 16 KiB signal value (the largest allowed)
/// are 1.1 MiB of state: a ListActions page of up to 1000 ends early with
/// a token at the 1 MiB budget, the pages together list every action once,
/// and a watch snapshot (read page by page) sends every child once before
/// the sentinel. A larger value is refused.
async fn listing_pages_and_snapshots_are_bounded_in_bytes(db: TestDb) {
    use actionsd::proto::flyteidl2::core::primitive;
    const CHILDREN: usize = 70;
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;
    client.enqueue(task("pb", "a0", None)).await.unwrap();
    let big = "v".repeat(16 * 1024 - 16);
    for i in 0..CHILDREN {
        let name = format!("c{i:03}");
        client
            .enqueue(condition("pb", &name, "a0", core::SimpleType::String))
            .await
            .unwrap();
        client
            .signal(signal(
                "pb",
                &name,
                "a0",
                primitive::Value::StringValue(big.clone()),
            ))
            .await
            .unwrap();
    }
    let too_big = signal(
        "pb",
        "c000",
        "a0",
        primitive::Value::StringValue("v".repeat(16 * 1024)),
    );
    let message = expect_code(client.signal(too_big).await, Code::InvalidArgument);
    assert!(message.starts_with("value: is 163"), "{message}");

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = reader
            .list_actions(ListActionsRequest {
                run: Some(run_id("pb")),
                limit: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page within the message limit")
            .into_inner();
        let bytes: usize = page.actions.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= 1024 * 1024 + 20 * 1024, "a page of {bytes} bytes");
        pages.push(page.actions.len());
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "pages never end: {pages:?}");
    }
    assert!(pages.len() >= 2, "one page held everything: {pages:?}");
    assert!(pages[0] < CHILDREN, "{pages:?}");
    assert_eq!(pages.iter().sum::<usize>(), CHILDREN + 1, "{pages:?}");

    let snapshot = snapshot(&mut client, "pb", "a0").await;
    let names: Vec<String> = snapshot
        .iter()
        .map(|u| u.action_id.as_ref().unwrap().name.clone())
        .collect();
    let mut expected = vec!["a0".to_owned()];
    expected.extend((0..CHILDREN).map(|i| format!("c{i:03}")));
    assert_eq!(names, expected);
    assert!(snapshot[1..]
        .iter()
        .all(|u| u.phase == SUCCEEDED && u.value.is_some()));
    daemon.stop().await;
}
