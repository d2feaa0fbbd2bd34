//! WatchForUpdates through the real pipeline: snapshot, sentinel, live
//! updates, ordering under load, slow readers and shutdown.

mod common;

conformance!(
    snapshot_then_sentinel_then_live,
    concurrent_lifecycles_never_go_backwards,
    slow_stream_keeps_final_states_without_delaying_others,
    shutdown_ends_streams_with_unavailable,
);

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tonic::Code;

async fn snapshot_then_sentinel_then_live(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();
    client.enqueue(task("r1", "a2", Some("a0"))).await.unwrap();
    client.enqueue(task("r1", "g1", Some("a1"))).await.unwrap();
    client
        .update(status_update("r1", "a2", 1, RUNNING))
        .await
        .unwrap();

    let mut stream = client
        .watch_for_updates(watch_request("r1", "a0"))
        .await
        .unwrap()
        .into_inner();
    let mut first = Vec::new();
    for _ in 0..4 {
        let message = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        first.push(classify(message));
    }
    // The parent first, then its direct children (not the grandchild),
    // then the sentinel.
    let names: Vec<(String, i32)> = first[..3]
        .iter()
        .map(|m| match m {
            Msg::Update(u) => (u.action_id.as_ref().unwrap().name.clone(), u.phase),
            Msg::Sentinel => panic!("sentinel before the snapshot ended"),
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("a0".to_owned(), QUEUED),
            ("a1".to_owned(), QUEUED),
            ("a2".to_owned(), RUNNING)
        ]
    );
    assert!(matches!(first[3], Msg::Sentinel));

    // Live: a change to a child, a new child, and the parent itself.
    client
        .update(status_update("r1", "a1", 1, RUNNING))
        .await
        .unwrap();
    client.enqueue(task("r1", "a3", Some("a0"))).await.unwrap();
    client
        .update(status_update("r1", "a0", 1, RUNNING))
        .await
        .unwrap();
    // A grandchild's change is not part of this stream.
    client
        .update(status_update("r1", "g1", 1, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("r1", "a2", 1, SUCCEEDED))
        .await
        .unwrap();
    let mut live = Vec::new();
    while live.len() < 4 {
        let message = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match classify(message) {
            Msg::Update(u) => live.push((u.action_id.unwrap().name, u.phase)),
            Msg::Sentinel => panic!("a second sentinel"),
        }
    }
    // Order is guaranteed per action, not across actions.
    live.sort();
    assert_eq!(
        live,
        vec![
            ("a0".to_owned(), RUNNING),
            ("a1".to_owned(), RUNNING),
            ("a2".to_owned(), SUCCEEDED),
            ("a3".to_owned(), QUEUED),
        ]
    );
    daemon.stop().await;
}

/// Moves every action of `names` through `phases`, all actions at once but
/// at most 32 requests in flight, as a well-behaved client would.
async fn run_lifecycles(client: &Client, run: &str, names: Vec<String>, phases: &[i32]) {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        let mut client = client.clone();
        let run = run.to_owned();
        let phases = phases.to_vec();
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            for phase in phases {
                let _permit = in_flight.acquire().await.unwrap();
                client
                    .update(status_update(&run, &name, 1, phase))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}

/// Checks that no action's phase ever went backwards in `updates`.
fn assert_never_backwards(watcher: &Watcher) {
    let mut seen: HashMap<String, i32> = HashMap::new();
    for update in &watcher.updates {
        let name = update.action_id.as_ref().unwrap().name.clone();
        if let Some(previous) = seen.get(&name) {
            assert!(
                rank(update.phase) > rank(*previous),
                "{name} went from {previous} to {} (or repeated it)",
                update.phase
            );
        }
        seen.insert(name, update.phase);
    }
}

async fn concurrent_lifecycles_never_go_backwards(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;

    let names: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let mut enqueues = tokio::task::JoinSet::new();
    for name in names.clone() {
        let mut client = client.clone();
        enqueues.spawn(async move { client.enqueue(task("r1", &name, Some("a0"))).await });
    }
    while let Some(result) = enqueues.join_next().await {
        result.unwrap().unwrap();
    }
    let updater = {
        let client = client.clone();
        let names = names.clone();
        tokio::spawn(
            async move { run_lifecycles(&client, "r1", names, &[RUNNING, SUCCEEDED]).await },
        )
    };
    watcher
        .until(|p| names.iter().all(|n| p.get(n) == Some(&SUCCEEDED)))
        .await;
    updater.await.unwrap();
    assert_never_backwards(&watcher);
    // Each version is sent at most once: the parent's snapshot entry plus
    // 200 children × 3 versions at most.
    assert!(watcher.updates.len() <= 601, "{}", watcher.updates.len());
    daemon.stop().await;
}

async fn slow_stream_keeps_final_states_without_delaying_others(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut setup = daemon.client().await;
    setup.enqueue(task("r1", "a0", None)).await.unwrap();
    let children = 500;
    let names: Vec<String> = (0..children).map(|i| format!("c{i}")).collect();
    for chunk in names.chunks(50) {
        let mut calls = tokio::task::JoinSet::new();
        for name in chunk {
            let mut client = setup.clone();
            let name = name.clone();
            calls.spawn(async move { client.enqueue(task("r1", &name, Some("a0"))).await });
        }
        while let Some(result) = calls.join_next().await {
            result.unwrap().unwrap();
        }
    }

    // Separate connections (HTTP/2 flow control is per connection too), and
    // a small receive window for the slow reader so that the server, not
    // the client's buffers, has to hold what it cannot send.
    let mut slow = Watcher::open(&mut daemon.client_with_window(4 * 1024).await, "r1", "a0").await;
    let mut fast = Watcher::open(&mut daemon.client().await, "r1", "a0").await;
    let snapshot_len = slow.updates.len();
    assert_eq!(snapshot_len, children + 1);

    let steps = [2, INITIALIZING, RUNNING, SUCCEEDED];
    let updater = {
        let client = setup.clone();
        let names = names.clone();
        tokio::spawn(async move { run_lifecycles(&client, "r1", names, &steps).await })
    };
    // The fast stream sees every final state while the slow one reads
    // nothing at all.
    fast.until(|p| names.iter().all(|n| p.get(n) == Some(&SUCCEEDED)))
        .await;
    updater.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    slow.until(|p| names.iter().all(|n| p.get(n) == Some(&SUCCEEDED)))
        .await;
    assert_never_backwards(&slow);
    assert_never_backwards(&fast);
    let sent_to_slow = slow.updates.len() - snapshot_len;
    assert!(
        sent_to_slow < children * steps.len(),
        "the slow stream was sent every intermediate state ({sent_to_slow}); \
         expected the server to coalesce while it was not read"
    );
    daemon.stop().await;
}

async fn shutdown_ends_streams_with_unavailable(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    client.enqueue(task("r1", "a1", Some("a0"))).await.unwrap();

    let stopping = tokio::spawn(daemon.stop());
    // Events committed before the shutdown are delivered first; then the
    // stream ends with UNAVAILABLE, never with OK.
    let status = loop {
        match tokio::time::timeout(TIMEOUT, watcher.stream.message())
            .await
            .expect("stream ends in time")
        {
            Ok(Some(message)) => {
                if let Msg::Update(u) = classify(message) {
                    watcher.phases.insert(u.action_id.unwrap().name, u.phase);
                }
            }
            Ok(None) => panic!("stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(watcher.phases.get("a1"), Some(&QUEUED));
    stopping.await.unwrap();
}
