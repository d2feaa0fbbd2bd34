//! Operations: `/metrics` scraped and parsed with a Prometheus text parser
//! after calls on each protocol, retention on both stores, and
//! `actionsd migrate --check`.

mod common;

conformance!(
    metrics_count_calls_on_every_protocol,
    metrics_on_an_admin_listener,
    metrics_cover_feed_lag_group_commits_and_coalescing,
    retention_deletes_finished_runs_and_nothing_still_going,
    retention_keeps_events_a_live_feed_position_still_needs,
    retention_deletes_the_blobs_and_logs_of_deleted_runs,
    retention_pass_beside_enqueue_latency,
    migrate_check_reports_pending_and_unknown_migrations,
    actionsctl_deletes_a_finished_run_and_refuses_one_still_going,
);

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actionsd::proto::actionsd::read::v1::{
    read_service_client::ReadServiceClient, DeleteRunRequest, GetActionRequest, ListRunsRequest,
};
use common::*;
use prost::Message;
use tonic::Code;

/// Scrapes `/metrics` and parses it with `prometheus-parse`.
async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let response = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrapes /metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

/// The value of the sample named `name` whose labels include `labels`
/// (0 when there is none).
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn rpc(service: &str, method: &str, protocol: &str, code: &str) -> Vec<(&'static str, String)> {
    vec![
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("protocol", protocol.to_owned()),
        ("code", code.to_owned()),
    ]
}

fn requests(scrape: &prometheus_parse::Scrape, labels: &[(&'static str, String)]) -> f64 {
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    value(scrape, "actionsd_rpc_requests_total", &labels)
}

/// Known calls on gRPC, gRPC-Web and Connect move the request counters by
/// service, method, protocol and code; the latency histogram, pool and
/// process metrics are there; no label carries an id.
async fn metrics_count_calls_on_every_protocol(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let before = scrape(daemon.addr).await;
    let mut client = daemon.client().await;
    let mut reader = ReadServiceClient::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap();
    let actions = "flyteidl2.actions.ActionsService";
    let read = "actionsd.read.v1.ReadService";

    // gRPC: two enqueues, one lookup that fails NOT_FOUND.
    client.enqueue(task("m1", "a0", None)).await.unwrap();
    client.enqueue(task("m1", "a1", Some("a0"))).await.unwrap();
    let missing = reader
        .get_action(GetActionRequest {
            id: Some(aid("m1", "nope")),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    // Connect (JSON): one ListRuns, one GetAction that is not found.
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let connect = |method: &str, body: &'static str| {
        http.post(format!("http://{}/{read}/{method}", daemon.addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(connect("ListRuns", "{}").await.unwrap().status(), 200);
    let not_found = connect(
        "GetAction",
        r#"{"id":{"run":{"project":"p","domain":"d","name":"none"},"name":"x"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(not_found.status(), 404);
    let _ = not_found.bytes().await;

    // gRPC-Web: one ListRuns, its status in the trailer frame.
    let message = ListRunsRequest::default().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let web = http
        .post(format!("http://{}/{read}/ListRuns", daemon.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(web.status(), 200);
    let body = web.bytes().await.unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("grpc-status:0"),
        "{body:?}"
    );

    // A watch stream counts as open while it is.
    let watcher = Watcher::open(&mut client, "m1", "a0").await;
    let during = scrape(daemon.addr).await;
    assert!(
        value(
            &during,
            "actionsd_open_streams",
            &[("method", "WatchForUpdates")]
        ) >= 1.0
    );
    drop(watcher);

    // Counters are recorded when a response ends; scrape until they are.
    let expected = [
        (rpc(actions, "Enqueue", "grpc", "ok"), 2.0),
        (rpc(read, "GetAction", "grpc", "not_found"), 1.0),
        (rpc(read, "ListRuns", "connect", "ok"), 1.0),
        (rpc(read, "GetAction", "connect", "not_found"), 1.0),
        (rpc(read, "ListRuns", "grpc_web", "ok"), 1.0),
    ];
    let deadline = Instant::now() + TIMEOUT;
    let after = loop {
        let after = scrape(daemon.addr).await;
        let moved = expected
            .iter()
            .all(|(labels, n)| requests(&after, labels) - requests(&before, labels) >= *n);
        if moved {
            break after;
        }
        assert!(Instant::now() < deadline, "counters did not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = |scrape: &prometheus_parse::Scrape| {
        scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == "actionsd_rpc_duration_seconds_count"
                    && s.labels.get("method") == Some("Enqueue")
                    && s.labels.get("protocol") == Some("grpc")
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    assert!(seconds(&after) - seconds(&before) >= 2.0);
    assert!(after
        .samples
        .iter()
        .any(|s| s.metric == "actionsd_rpc_duration_seconds"
            && matches!(s.value, prometheus_parse::Value::Histogram(_))));
    assert!(value(&after, "actionsd_store_pool_max_connections", &[]) >= 1.0);
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&after, "actionsd_store_up", &[]) == 1.0);
    // Bounded labels: no run or action name appears anywhere.
    for sample in &after.samples {
        for (_, label) in sample.labels.iter() {
            assert!(!label.contains("m1") && !label.contains("nope"), "{label}");
        }
    }
    daemon.stop().await;
}

/// The histogram's `_count` (or `_sum`) sample of `name`, over all labels.
fn histogram_part(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// After known writes: every event is counted in the feed lag histogram
/// (with a lag that is not absurd), every write in a group commit, and a
/// stream that is not read coalesces the states it cannot send. The
/// recorder is shared by the tests of this process, so each check is a
/// lower bound on how far a series moved.
async fn metrics_cover_feed_lag_group_commits_and_coalescing(db: TestDb) {
    const CHILDREN: usize = 100;
    let daemon = Daemon::start(&db).await;
    let before = scrape(daemon.addr).await;
    let mut client = daemon.client().await;
    client.enqueue(task("lag1", "a0", None)).await.unwrap();
    let names: Vec<String> = (0..CHILDREN).map(|i| format!("c{i}")).collect();
    for name in &names {
        client
            .enqueue(task("lag1", name, Some("a0")))
            .await
            .unwrap();
    }
    // A stream with a 4 KiB window that reads nothing after its snapshot:
    // the server holds what it cannot send, one pending state per action.
    let slow = Watcher::open(&mut daemon.client_with_window(4 * 1024).await, "lag1", "a0").await;
    let mut fast = Watcher::open(&mut client, "lag1", "a0").await;
    for phase in [INITIALIZING, RUNNING, SUCCEEDED] {
        let mut calls = tokio::task::JoinSet::new();
        for name in &names {
            let mut client = client.clone();
            let name = name.clone();
            calls.spawn(async move { client.update(status_update("lag1", &name, 1, phase)).await });
        }
        while let Some(result) = calls.join_next().await {
            result.unwrap().unwrap();
        }
    }
    fast.until(|p| names.iter().all(|n| p.get(n) == Some(&SUCCEEDED)))
        .await;
    // Writes: the root, the children, three updates each.
    let writes = (1 + CHILDREN * 4) as f64;
    let after = scrape(daemon.addr).await;
    let moved = |name: &str| histogram_part(&after, name) - histogram_part(&before, name);
    assert!(
        moved("actionsd_feed_lag_seconds_count") >= writes,
        "feed lag counted {} events, expected at least {writes}",
        moved("actionsd_feed_lag_seconds_count")
    );
    // Lags of events this daemon wrote and delivered within the test.
    let mean_lag =
        moved("actionsd_feed_lag_seconds_sum") / moved("actionsd_feed_lag_seconds_count");
    assert!(
        (0.0..TIMEOUT.as_secs_f64()).contains(&mean_lag),
        "{mean_lag}"
    );
    assert!(
        moved("actionsd_commit_batch_size_sum") >= writes,
        "group commits applied {} commands, expected at least {writes}",
        moved("actionsd_commit_batch_size_sum")
    );
    assert!(moved("actionsd_commit_batch_size_count") >= 1.0);
    assert!(moved("actionsd_commit_duration_seconds_count") >= 1.0);
    assert!(after
        .samples
        .iter()
        .any(|s| s.metric == "actionsd_commit_batch_size"
            && matches!(s.value, prometheus_parse::Value::Histogram(_))));
    let coalesced = value(&after, "actionsd_updates_coalesced_total", &[])
        - value(&before, "actionsd_updates_coalesced_total", &[]);
    assert!(
        coalesced >= 1.0,
        "a stream that was not read coalesced nothing"
    );
    drop(slow);
    daemon.stop().await;
}

/// With `metrics.listen` set, `/metrics` moves to the admin listener and
/// the API port no longer answers it.
async fn metrics_on_an_admin_listener(db: TestDb) {
    let daemon = Daemon::start_with(&db, |config| {
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = daemon.admin_addr.expect("an admin listener");
    let scraped = scrape(admin).await;
    assert!(scraped
        .docs
        .contains_key("actionsd_store_pool_max_connections"));
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let api = http
        .get(format!("http://{}/metrics", daemon.addr))
        .send()
        .await
        .unwrap();
    assert_ne!(api.status(), 200);
    daemon.stop().await;
}

/// Counts of (run, rows) in one table.
async fn per_run(db: &TestDb, table: &str) -> HashMap<String, i64> {
    let column = if table == "runs" { "name" } else { "run_name" };
    rows!(
        db,
        (String, i64),
        &format!("SELECT {column}, count(*) FROM {table} GROUP BY {column}")
    )
    .into_iter()
    .collect()
}

/// Finished runs go, with every action and event, once their root ended
/// `period` ago; a run still going stays whole, however old; a run that
/// finishes while passes keep running stays until its own period is over.
async fn retention_deletes_finished_runs_and_nothing_still_going(db: TestDb) {
    let period = Duration::from_secs(2);
    let daemon = Daemon::start_with(&db, |config| {
        config.retention.period = period;
        config.retention.interval = Duration::from_millis(100);
        config.retention.batch_size = 2;
        config.retention.batch_pause = Duration::from_millis(1);
    })
    .await;
    let mut client = daemon.client().await;
    // Five finished runs (more than two batches), each with a child.
    for n in 0..5 {
        let run = format!("done{n}");
        client.enqueue(task(&run, "a0", None)).await.unwrap();
        client.enqueue(task(&run, "a1", Some("a0"))).await.unwrap();
        client
            .update(status_update(&run, "a1", 1, SUCCEEDED))
            .await
            .unwrap();
        client
            .update(status_update(&run, "a0", 1, SUCCEEDED))
            .await
            .unwrap();
    }
    // A run still going: its root runs.
    client.enqueue(task("going", "a0", None)).await.unwrap();
    client
        .update(status_update("going", "a0", 1, RUNNING))
        .await
        .unwrap();
    // A run whose root finished while a child still runs.
    client.enqueue(task("child", "a0", None)).await.unwrap();
    client
        .enqueue(task("child", "a1", Some("a0")))
        .await
        .unwrap();
    client
        .update(status_update("child", "a1", 1, RUNNING))
        .await
        .unwrap();
    let root_finished = client
        .update(status_update("child", "a0", 1, SUCCEEDED))
        .await
        .is_ok();
    // A run that finishes later, while passes run every 100 ms.
    client.enqueue(task("late", "a0", None)).await.unwrap();

    let deadline = Instant::now() + TIMEOUT;
    loop {
        let runs = per_run(&db, "runs").await;
        if (0..5).all(|n| !runs.contains_key(&format!("done{n}"))) {
            break;
        }
        assert!(Instant::now() < deadline, "finished runs were not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .update(status_update("late", "a0", 1, SUCCEEDED))
        .await
        .unwrap();
    let finished_late = Instant::now();
    // Several passes after it finished, within its period: still whole.
    tokio::time::sleep(period / 2).await;
    let (runs, actions, events) = (
        per_run(&db, "runs").await,
        per_run(&db, "actions").await,
        per_run(&db, "events").await,
    );
    assert!(finished_late.elapsed() < period, "the machine is too slow");
    for n in 0..5 {
        let run = format!("done{n}");
        assert!(!actions.contains_key(&run) && !events.contains_key(&run));
    }
    assert_eq!(runs.get("late"), Some(&1));
    assert_eq!(events.get("late"), Some(&2), "{events:?}");
    // Long after: the late run is gone, those still going are whole.
    let deadline = Instant::now() + TIMEOUT;
    while per_run(&db, "runs").await.contains_key("late") {
        assert!(Instant::now() < deadline, "the late run was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(period).await;
    let (runs, actions, events) = (
        per_run(&db, "runs").await,
        per_run(&db, "actions").await,
        per_run(&db, "events").await,
    );
    assert_eq!(actions.get("going"), Some(&1));
    assert_eq!(events.get("going"), Some(&2));
    if root_finished {
        assert_eq!(runs.get("child"), Some(&1));
        assert_eq!(actions.get("child"), Some(&2));
    }
    let scraped = scrape(daemon.addr).await;
    assert!(
        value(
            &scraped,
            "actionsd_retention_deleted_total",
            &[("kind", "runs")]
        ) >= 6.0
    );
    daemon.stop().await;
}

/// `actionsd migrate --check` exits 0 on an up-to-date database and
/// non-zero, naming the problem, when a migration is pending or unknown.
/// Enqueues a finished run: a root and a child, both succeeded.
async fn finished_run(client: &mut Client, run: &str) {
    client.enqueue(task(run, "a0", None)).await.unwrap();
    client.enqueue(task(run, "a1", Some("a0"))).await.unwrap();
    for name in ["a1", "a0"] {
        client
            .update(status_update(run, name, 1, SUCCEEDED))
            .await
            .unwrap();
    }
}

/// Waits until `run` has no row left in runs and events.
async fn until_deleted(db: &TestDb, run: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while per_run(db, "runs").await.contains_key(run)
        || per_run(db, "events").await.contains_key(run)
    {
        assert!(Instant::now() < deadline, "run {run} was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets the feed position of another daemon: before every event (`start`)
/// or past every event so far, live for an hour or already expired.
async fn other_daemon_at(db: &TestDb, start: bool, live: bool) {
    let sql = if db.is_postgres() {
        let (xid, seq) = if start {
            ("'1'::xid8", "0")
        } else {
            (
                "(SELECT max(xid) FROM events)",
                "(SELECT max(seq) FROM events)",
            )
        };
        let expires = if live {
            "now() + interval '1 hour'"
        } else {
            "now() - interval '1 second'"
        };
        format!(
            "INSERT INTO feed_positions (daemon, xid, seq, expires_at) VALUES ('other', {xid}, {seq}, {expires}) \
             ON CONFLICT (daemon) DO UPDATE SET xid = EXCLUDED.xid, seq = EXCLUDED.seq, \
             expires_at = EXCLUDED.expires_at RETURNING 1::bigint"
        )
    } else {
        let seq = if start {
            "0"
        } else {
            "(SELECT max(seq) FROM events)"
        };
        let now = chrono::Utc::now().timestamp_micros();
        let expires = if live {
            now + 3_600_000_000
        } else {
            now - 1_000_000
        };
        format!(
            "INSERT INTO feed_positions (daemon, seq, expires_at) VALUES ('other', {seq}, {expires}) \
             ON CONFLICT (daemon) DO UPDATE SET seq = excluded.seq, \
             expires_at = excluded.expires_at RETURNING 1"
        )
    };
    assert_eq!(rows!(db, (i64,), &sql).len(), 1);
}

/// A second daemon's live feed position below a finished run's events
/// keeps them (and the run) through every pass; once that daemon has read
/// past them, or its position expired (a dead daemon), the run goes. The
/// daemon's own feed records its position too.
async fn retention_keeps_events_a_live_feed_position_still_needs(db: TestDb) {
    let daemon = Daemon::start_with(&db, |config| {
        config.retention.period = Duration::from_millis(1);
        config.retention.interval = Duration::from_millis(100);
    })
    .await;
    let mut client = daemon.client().await;
    other_daemon_at(&db, true, true).await;
    finished_run(&mut client, "pinned").await;
    // Once this daemon's own recorded position is past the run's events
    // (it records every few seconds), only the other daemon holds them.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let past = rows!(
            db,
            (i64,),
            "SELECT count(*) FROM feed_positions WHERE daemon <> 'other' \
             AND seq >= (SELECT max(seq) FROM events)"
        );
        if past[0].0 == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never recorded its position"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Many passes later, the run and its events are all still there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(per_run(&db, "runs").await.get("pinned"), Some(&1));
    assert_eq!(per_run(&db, "events").await.get("pinned"), Some(&4));
    let positions = rows!(
        db,
        (i64,),
        "SELECT count(*) FROM feed_positions WHERE daemon <> 'other'"
    );
    assert_eq!(
        positions[0].0, 1,
        "the daemon records its own feed position"
    );
    // The other daemon reads past the run: it goes.
    other_daemon_at(&db, false, true).await;
    until_deleted(&db, "pinned").await;
    // An expired position (a daemon that stopped) pins nothing.
    other_daemon_at(&db, true, false).await;
    finished_run(&mut client, "unpinned").await;
    until_deleted(&db, "unpinned").await;
    daemon.stop().await;
    let positions = rows!(
        db,
        (i64,),
        "SELECT count(*) FROM feed_positions WHERE daemon <> 'other'"
    );
    assert_eq!(
        positions[0].0, 0,
        "a daemon that stops removes its position"
    );
}

/// Files under `dir`, recursively, relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Writes a run's blob and one log chunk into the local blob directory,
/// where actionsd keeps them.
fn write_run_objects(dir: &std::path::Path, run: &str) -> Vec<String> {
    let id = actionsd::domain::RunId {
        org: String::new(),
        project: "flytesnacks".to_owned(),
        domain: "development".to_owned(),
        name: run.to_owned(),
    };
    let keys = [
        actionsd::blob::keys::run_base(&id)
            .child("a0")
            .child("outputs.pb"),
        actionsd::blob::keys::run_logs(&id)
            .child("a0")
            .child("1")
            .child("0000000000.pb"),
    ];
    keys.iter()
        .map(|key| {
            let path = dir.join(key.as_ref());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
            key.as_ref().to_owned()
        })
        .collect()
}

/// A run deleted by retention, and one deleted by hand, lose their blobs
/// and logs; a run still going keeps its own.
async fn retention_deletes_the_blobs_and_logs_of_deleted_runs(db: TestDb) {
    let blobs = tempfile::tempdir().unwrap();
    let dir = blobs.path().to_path_buf();
    let period = Duration::from_secs(3);
    let daemon = Daemon::start_with(&db, |config| {
        config.blobs.location = Some(actionsd::blob::BlobLocation::Local(dir.clone()));
        config.retention.period = period;
        config.retention.interval = Duration::from_millis(100);
    })
    .await;
    let mut client = daemon.client().await;
    let mut reader = ReadServiceClient::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap();
    finished_run(&mut client, "old").await;
    finished_run(&mut client, "byhand").await;
    client.enqueue(task("going", "a0", None)).await.unwrap();
    let old = write_run_objects(&dir, "old");
    let by_hand = write_run_objects(&dir, "byhand");
    let going = write_run_objects(&dir, "going");
    for key in old.iter().chain(&by_hand).chain(&going) {
        assert!(files_under(&dir).contains(key), "{key}");
    }
    let started = Instant::now();
    reader
        .delete_run(DeleteRunRequest {
            run_id: Some(run_id("byhand")),
        })
        .await
        .unwrap();
    // Deleted by hand: its objects go at the next pass, well within the
    // period of the other run.
    let deadline = Instant::now() + TIMEOUT;
    while by_hand.iter().any(|k| files_under(&dir).contains(k)) {
        assert!(
            Instant::now() < deadline,
            "the blobs of a run deleted by hand stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if started.elapsed() < period {
        assert!(old.iter().all(|k| files_under(&dir).contains(k)));
    }
    until_deleted(&db, "old").await;
    let deadline = Instant::now() + TIMEOUT;
    while old.iter().any(|k| files_under(&dir).contains(k)) {
        assert!(
            Instant::now() < deadline,
            "the blobs of a run deleted by retention stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for key in &going {
        assert!(
            files_under(&dir).contains(key),
            "{key} of a run still going was deleted"
        );
    }
    assert_eq!(rows!(db, (i64,), "SELECT count(*) FROM run_purges")[0].0, 0);
    let scraped = scrape(daemon.addr).await;
    assert!(
        value(
            &scraped,
            "actionsd_retention_deleted_total",
            &[("kind", "blobs")]
        ) >= 4.0
    );
    daemon.stop().await;
}

/// Seeds 1,000 finished runs of 100 actions (100,000 actions, 200,000
/// events), all ended a day ago, straight into the tables.
async fn seed_finished_actions(db: &TestDb) {
    let statements: Vec<String> = if db.is_postgres() {
        vec![
            "INSERT INTO runs (org, project, domain, name, root_name, run_spec) \
             SELECT '', 'bench', 'retention', 'old' || r, 'a0', '\\x00'::bytea \
             FROM generate_series(1, 1000) r"
                .to_owned(),
            "INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, phase, \
                 spec, start_time, end_time, created_at) \
             SELECT '', 'bench', 'retention', 'old' || r, \
                 CASE WHEN c = 0 THEN 'a0' ELSE 'c' || c END, \
                 CASE WHEN c = 0 THEN NULL ELSE 'a0' END, 1, 5, '\\x00'::bytea, \
                 now() - interval '25 hours', now() - interval '1 day', now() - interval '2 days' \
             FROM generate_series(1, 1000) r, generate_series(0, 99) c"
                .to_owned(),
            "INSERT INTO events (org, project, domain, run_name, name, parent_name, version, phase, \
                 attempt, output_uri) \
             SELECT org, project, domain, run_name, name, parent_name, v, \
                 CASE WHEN v = 1 THEN 1 ELSE 5 END, 1, '' \
             FROM actions, generate_series(1, 2) v WHERE domain = 'retention'"
                .to_owned(),
            "ANALYZE".to_owned(),
        ]
    } else {
        let day = 86_400_000_000_i64;
        let now = chrono::Utc::now().timestamp_micros();
        vec![
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 1000) \
             INSERT INTO runs (org, project, domain, name, root_name, run_spec) \
             SELECT '', 'bench', 'retention', 'old' || n, 'a0', X'00' FROM r"
                .to_owned(),
            format!(
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 1000), \
                 c(m) AS (SELECT 0 UNION ALL SELECT m + 1 FROM c WHERE m < 99) \
                 INSERT INTO actions (org, project, domain, run_name, name, parent_name, kind, \
                     phase, spec, start_time, end_time, created_at) \
                 SELECT '', 'bench', 'retention', 'old' || n, \
                     CASE WHEN m = 0 THEN 'a0' ELSE 'c' || m END, \
                     CASE WHEN m = 0 THEN NULL ELSE 'a0' END, 1, 5, X'00', {}, {}, {} FROM r, c",
                now - day - day / 24,
                now - day,
                now - 2 * day
            ),
            "INSERT INTO events (org, project, domain, run_name, name, parent_name, version, phase, \
                 attempt, output_uri) \
             SELECT org, project, domain, run_name, name, parent_name, v, \
                 CASE WHEN v = 1 THEN 1 ELSE 5 END, 1, '' \
             FROM actions, (SELECT 1 AS v UNION ALL SELECT 2) WHERE domain = 'retention'"
                .to_owned(),
        ]
    };
    for statement in &statements {
        rows!(db, (i64,), statement);
    }
}

/// Enqueue latencies of `clients` callers, each adding children to a run
/// of its own one call at a time, until `stop` is set (or 5,000 calls
/// each, or two minutes).
async fn enqueue_load(
    daemon: &Daemon,
    prefix: &str,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..clients {
        let mut client = daemon.client().await;
        let run = format!("{prefix}{n}");
        let stop = stop.clone();
        tasks.spawn(async move {
            client.enqueue(task(&run, "a0", None)).await.unwrap();
            let started = Instant::now();
            let mut latencies = Vec::new();
            for i in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || started.elapsed() > Duration::from_secs(120)
                {
                    break;
                }
                let call = Instant::now();
                client
                    .enqueue(task(&run, &format!("c{i}"), Some("a0")))
                    .await
                    .unwrap();
                latencies.push(call.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(latencies) = tasks.join_next().await {
        all.extend(latencies.unwrap());
    }
    all.sort();
    all
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// Enqueue p99 while a retention pass deletes 100,000 finished actions,
/// beside the same load (as long) without it. Writers never wait on a
/// retention batch, so the p99 during the pass stays within 4× the p99
/// without it plus 100 ms (a generous bound for a shared test machine;
/// the benchmark measures the same comparison in a release build).
async fn retention_pass_beside_enqueue_latency(db: TestDb) {
    const CLIENTS: usize = 8;
    // A daemon without retention creates the schema; the seed goes in
    // while no pass runs.
    let setup = Daemon::start_with(&db, |config| config.retention.enabled = false).await;
    seed_finished_actions(&db).await;
    setup.stop().await;
    // The setup daemon may stop before its feed has read the seed (its
    // position would then pin the seeded runs until it expires).
    rows!(db, (i64,), "DELETE FROM feed_positions");
    let seeded = "SELECT count(*) FROM actions WHERE domain = 'retention'";
    assert_eq!(rows!(db, (i64,), seeded)[0].0, 100_000);

    // Its first pass starts with the daemon: in batches of 20 runs.
    let daemon = Daemon::start_with(&db, |config| {
        config.retention.period = Duration::from_secs(3600);
        config.retention.interval = Duration::from_secs(3600);
        config.retention.batch_size = 20;
        config.retention.batch_pause = Duration::from_millis(10);
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = enqueue_load(&daemon, "during", CLIENTS, stop.clone());
    let started = Instant::now();
    let watch = async {
        let deadline = Instant::now() + Duration::from_secs(180);
        while rows!(db, (i64,), seeded)[0].0 > 0 {
            assert!(
                Instant::now() < deadline,
                "the retention pass did not finish"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let pass = started.elapsed();
        // At least a second of load, for enough samples.
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(pass)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pass
    };
    let (during, pass) = tokio::join!(load, watch);
    let measured = started.elapsed().min(Duration::from_secs(10));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        async move {
            tokio::time::sleep(measured).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let (alone, ()) = tokio::join!(enqueue_load(&daemon, "alone", CLIENTS, stop), timer);
    println!(
        "retention pass over 100,000 actions: {:.2} s; enqueue ×{CLIENTS} p99 during it {:.2} ms \
         ({} calls), without it {:.2} ms ({} calls)",
        pass.as_secs_f64(),
        p99(&during).as_secs_f64() * 1e3,
        during.len(),
        p99(&alone).as_secs_f64() * 1e3,
        alone.len()
    );
    assert!(during.len() >= 20 && alone.len() >= 20);
    assert!(
        p99(&during) <= p99(&alone) * 4 + Duration::from_millis(100),
        "enqueue p99 during retention {:?}, without {:?}",
        p99(&during),
        p99(&alone)
    );
    daemon.stop().await;
}

async fn migrate_check_reports_pending_and_unknown_migrations(db: TestDb) {
    let check = |url: String| async move {
        tokio::time::timeout(
            TIMEOUT,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_actionsd"))
                .args(["migrate", "--check", "--database-url", &url])
                .env_remove("ACTIONSD_CONFIG")
                .output(),
        )
        .await
        .expect("in time")
        .expect("runs")
    };
    if !db.is_postgres() {
        // A missing file: everything is pending.
        let output = check(db.url()).await;
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("pending"));
        // Brought up to date by a daemon.
        Daemon::start(&db).await.stop().await;
    }
    let output = check(db.url()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let unknown = "INSERT INTO _sqlx_migrations \
        (version, description, success, checksum, execution_time) \
        VALUES (29991231000000, 'from the future', true, x'00', 0)";
    let forget = "DELETE FROM _sqlx_migrations WHERE version = 20261201040000";
    for statement in [unknown, forget] {
        match &db {
            TestDb::Postgres(pool) => {
                let statement = statement.replace("x'00'", "'\\x00'::bytea");
                sqlx::query(&statement).execute(pool).await.unwrap();
            }
            TestDb::Sqlite { pool, .. } => {
                sqlx::query(statement).execute(pool).await.unwrap();
            }
        }
    }
    let output = check(db.url()).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown migrations [29991231000000]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pending migrations [20261201040000]"),
        "{stderr}"
    );
}

/// The dashboard and the alert rules parse, and every actionsd metric they
/// query is one the daemon records.
#[test]
fn dashboard_and_alerts_use_only_recorded_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    let alerts = std::fs::read_to_string(root.join("prometheus-alerts.yml")).unwrap();
    let alerts: serde_yaml_ng::Value = serde_yaml_ng::from_str(&alerts).expect("alerts YAML");
    let rules = alerts["groups"][0]["rules"].as_sequence().expect("rules");
    assert!(rules.len() >= 4);
    queries.extend(
        rules
            .iter()
            .map(|r| r["expr"].as_str().expect("expr").to_owned()),
    );
    let mut seen = 0;
    for query in &queries {
        for (start, _) in query.match_indices("actionsd_") {
            let name: String = query[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                actionsd::metrics::names::ALL.contains(&base),
                "{name} in {query}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 15, "{seen}");
}

/// `actionsctl delete-run`: a finished run goes with its actions and
/// events; a run still going is refused (exit 5, FAILED_PRECONDITION) and
/// kept whole; an unknown run is NOT_FOUND.
async fn actionsctl_deletes_a_finished_run_and_refuses_one_still_going(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("fin", "a0", None)).await.unwrap();
    client.enqueue(task("fin", "a1", Some("a0"))).await.unwrap();
    client
        .update(status_update("fin", "a1", 1, SUCCEEDED))
        .await
        .unwrap();
    client
        .update(status_update("fin", "a0", 1, FAILED))
        .await
        .unwrap();
    client.enqueue(task("live", "a0", None)).await.unwrap();
    let ctl = |args: Vec<&'static str>| {
        let server = format!("http://{}", daemon.addr);
        async move {
            let output = tokio::time::timeout(
                TIMEOUT,
                tokio::process::Command::new(env!("CARGO_BIN_EXE_actionsctl"))
                    .env("ACTIONSD_SERVER", server)
                    .env_remove("ACTIONSD_ORG")
                    .env_remove("ACTIONSD_PROJECT")
                    .env_remove("ACTIONSD_DOMAIN")
                    .env_remove("ACTIONSD_OUTPUT")
                    .args(["--project", "flytesnacks", "--domain", "development"])
                    .args(args)
                    .output(),
            )
            .await
            .expect("in time")
            .expect("runs");
            (
                output.status.code().expect("exited"),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let (code, stdout, stderr) = ctl(vec!["delete-run", "fin"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 actions, 4 events"), "{stdout}");
    let (code, _, stderr) = ctl(vec!["delete-run", "live"]).await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("still going"), "{stderr}");
    let (code, _, stderr) = ctl(vec!["delete-run", "fin"]).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    let runs = per_run(&db, "runs").await;
    assert!(!runs.contains_key("fin") && runs.contains_key("live"));
    assert!(!per_run(&db, "events").await.contains_key("fin"));
    assert_eq!(per_run(&db, "actions").await.get("live"), Some(&1));
    daemon.stop().await;
}
