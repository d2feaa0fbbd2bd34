//! The read API (`actionsd.read.v1.ReadService`) over real gRPC and
//! Connect, on both stores.

mod common;

conformance!(
    get_action_returns_what_the_store_holds,
    list_actions_filters_and_pages_in_a_stable_order,
    list_runs_counts_phases_newest_first,
    history_lists_every_change_in_order,
    watch_run_streams_the_whole_tree,
    read_api_over_connect_json,
);

use std::collections::{HashMap, HashSet};

use actionsd::proto::actionsd::read::v1::{
    read_service_client::ReadServiceClient, watch_run_response, ActionKind, ActionSummary,
    GetActionRequest, GetHistoryRequest, ListActionsRequest, ListRunsRequest, PhaseCount,
    WatchRunRequest, WatchRunResponse,
};
use actionsd::proto::flyteidl2::core::{self, primitive};
use common::*;
use tonic::transport::Channel;
use tonic::Code;

type Reader = ReadServiceClient<Channel>;

async fn reader(daemon: &Daemon) -> Reader {
    ReadServiceClient::connect(format!("http://{}", daemon.addr))
        .await
        .expect("connects")
}

fn get(run: &str, name: &str) -> GetActionRequest {
    GetActionRequest {
        id: Some(aid(run, name)),
    }
}

fn names(actions: &[ActionSummary]) -> Vec<String> {
    actions
        .iter()
        .map(|a| a.id.as_ref().unwrap().name.clone())
        .collect()
}

async fn get_action_returns_what_the_store_holds(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;

    let child = task("g1", "a1", Some("a0"));
    client.enqueue(task("g1", "a0", None)).await.unwrap();
    client.enqueue(child.clone()).await.unwrap();
    client
        .enqueue(condition("g1", "gate", "a0", core::SimpleType::Integer))
        .await
        .unwrap();

    let queued = reader
        .get_action(get("g1", "a1"))
        .await
        .unwrap()
        .into_inner();
    let summary = queued.action.unwrap();
    assert_eq!(summary.id, Some(aid("g1", "a1")));
    assert_eq!(summary.parent_name, "a0");
    assert_eq!(summary.kind(), ActionKind::Task);
    assert_eq!(
        (summary.phase, summary.attempt, summary.version),
        (QUEUED, 1, 1)
    );
    assert_eq!(summary.queue, "default");
    assert!(summary.created_at.is_some() && summary.updated_at.is_some());
    assert!(summary.start_time.is_none() && summary.error.is_none());
    // The spec is the Action as enqueued.
    assert_eq!(queued.spec, child.action);

    let mut running = status_update("g1", "a1", 1, RUNNING);
    running.status.as_mut().unwrap().start_time = Some(prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 0,
    });
    client.update(running).await.unwrap();
    let summary = reader
        .get_action(get("g1", "a1"))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!((summary.phase, summary.version), (RUNNING, 2));
    assert_eq!(summary.start_time.unwrap().seconds, 1_800_000_000);

    client
        .signal(signal("g1", "gate", "a0", primitive::Value::Integer(42)))
        .await
        .unwrap();
    let gate = reader
        .get_action(get("g1", "gate"))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(gate.kind(), ActionKind::Condition);
    assert_eq!(gate.phase, SUCCEEDED);
    assert_eq!(
        gate.signal_value,
        Some(primitive_literal(primitive::Value::Integer(42)))
    );

    client.abort(abort("g1", "a0", "operator")).await.unwrap();
    let root = reader
        .get_action(get("g1", "a0"))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(root.phase, ABORTED);
    assert_eq!(root.abort_reason, "operator");
    assert_eq!(root.error.unwrap().message, "operator");
    assert_eq!(root.parent_name, "");

    let msg = expect_code(reader.get_action(get("g1", "nope")).await, Code::NotFound);
    assert!(msg.contains("nope"), "{msg}");
    let msg = expect_code(
        reader.get_action(GetActionRequest::default()).await,
        Code::InvalidArgument,
    );
    assert_eq!(msg, "id: is required");
    daemon.stop().await;
}

/// Follows next_page_token to the end, checking each page's size.
async fn walk(reader: &mut Reader, mut request: ListActionsRequest) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    for _ in 0..100 {
        let page = reader
            .list_actions(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= request.limit as usize);
        pages.push(names(&page.actions));
        if page.next_page_token.is_empty() {
            return pages;
        }
        request.page_token = page.next_page_token;
    }
    panic!("listing did not end within 100 pages");
}

async fn list_actions_filters_and_pages_in_a_stable_order(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;

    client.enqueue(task("l1", "a0", None)).await.unwrap();
    let mut children = Vec::new();
    for i in 0..24 {
        let name = format!("c{i:02}");
        client.enqueue(task("l1", &name, Some("a0"))).await.unwrap();
        children.push(name);
    }
    client.enqueue(task("l1", "g0", Some("c00"))).await.unwrap();
    client.enqueue(task("l2", "a0", None)).await.unwrap();
    for name in ["c03", "c07", "c11"] {
        client
            .update(status_update("l1", name, 1, RUNNING))
            .await
            .unwrap();
    }

    // The whole run, 7 at a time: every action once, in enqueue order.
    let by_run = ListActionsRequest {
        run: Some(run_id("l1")),
        limit: 7,
        ..Default::default()
    };
    let pages = walk(&mut reader, by_run.clone()).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7, 7, 5]);
    let all: Vec<String> = pages.concat();
    let mut expected = vec!["a0".to_owned()];
    expected.extend(children.iter().cloned());
    expected.push("g0".into());
    assert_eq!(all, expected);
    // The order is stable: the same walk gives the same pages.
    assert_eq!(walk(&mut reader, by_run.clone()).await, pages);

    // Children of one parent; phases; queue; and every run at once.
    let by_parent = ListActionsRequest {
        run: Some(run_id("l1")),
        parent_name: "c00".into(),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(walk(&mut reader, by_parent).await.concat(), ["g0"]);
    let running = ListActionsRequest {
        phases: vec![RUNNING],
        limit: 2,
        ..Default::default()
    };
    assert_eq!(
        walk(&mut reader, running).await.concat(),
        ["c03", "c07", "c11"]
    );
    let queued_in_l2 = ListActionsRequest {
        run: Some(run_id("l2")),
        phases: vec![QUEUED, RUNNING],
        queue: "default".into(),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(walk(&mut reader, queued_in_l2).await.concat(), ["a0"]);
    let none = ListActionsRequest {
        queue: "elsewhere".into(),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(walk(&mut reader, none).await.concat(), Vec::<String>::new());
    let everything = ListActionsRequest {
        limit: 1000,
        ..Default::default()
    };
    assert_eq!(walk(&mut reader, everything).await.concat().len(), 27);

    // A page token from one listing starts exactly after its last item.
    let first = reader
        .list_actions(by_run.clone())
        .await
        .unwrap()
        .into_inner();
    let mut next = by_run.clone();
    next.page_token = first.next_page_token;
    next.limit = 1;
    let second = reader.list_actions(next).await.unwrap().into_inner();
    assert_eq!(names(&second.actions), [children[6].clone()]);

    for (request, field) in [
        (
            ListActionsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token:",
        ),
        (
            ListActionsRequest {
                limit: 5000,
                ..Default::default()
            },
            "limit:",
        ),
        (
            ListActionsRequest {
                parent_name: "a0".into(),
                ..Default::default()
            },
            "parent_name:",
        ),
        (
            ListActionsRequest {
                phases: vec![0],
                ..Default::default()
            },
            "phases[0]:",
        ),
    ] {
        let msg = expect_code(reader.list_actions(request).await, Code::InvalidArgument);
        assert!(msg.starts_with(field), "{msg}");
    }
    daemon.stop().await;
}

async fn list_runs_counts_phases_newest_first(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;

    for run in ["r1", "r2", "r3"] {
        client.enqueue(task(run, "a0", None)).await.unwrap();
        // Distinct creation times, so "newest first" is observable.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for name in ["b1", "b2", "b3"] {
        client.enqueue(task("r1", name, Some("a0"))).await.unwrap();
    }
    client
        .update(status_update("r1", "a0", 1, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("r1", "b1", 1, RUNNING))
        .await
        .unwrap();
    client.abort(abort("r2", "a0", "stop")).await.unwrap();

    let first = reader
        .list_runs(ListRunsRequest {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = first
        .runs
        .iter()
        .map(|r| r.id.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(ids, ["r3", "r2"]);
    assert_eq!(first.runs[1].phase, ABORTED);
    assert!(!first.next_page_token.is_empty());
    let rest = reader
        .list_runs(ListRunsRequest {
            limit: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.runs.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let r1 = &rest.runs[0];
    assert_eq!(r1.id, Some(run_id("r1")));
    assert_eq!(
        (r1.root_name.as_str(), r1.phase, r1.actions),
        ("a0", RUNNING, 4)
    );
    assert_eq!(
        r1.counts,
        [
            PhaseCount {
                phase: QUEUED,
                count: 2
            },
            PhaseCount {
                phase: RUNNING,
                count: 2
            },
        ]
    );

    // Filters: a project with no runs lists none.
    let other = reader
        .list_runs(ListRunsRequest {
            project: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.runs.is_empty());
    let msg = expect_code(
        reader
            .list_runs(ListRunsRequest {
                page_token: "x".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(msg.starts_with("page_token:"), "{msg}");
    daemon.stop().await;
}

async fn history_lists_every_change_in_order(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;

    client.enqueue(task("h1", "a0", None)).await.unwrap();
    client
        .update(status_update("h1", "a0", 1, RUNNING))
        .await
        .unwrap();
    // A no-op is not a change.
    client
        .update(status_update("h1", "a0", 1, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("h1", "a0", 1, SUCCEEDED))
        .await
        .unwrap();

    let events = reader
        .get_history(GetHistoryRequest {
            id: Some(aid("h1", "a0")),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let seen: Vec<(u64, i32)> = events.iter().map(|e| (e.version, e.phase)).collect();
    assert_eq!(seen, [(1, QUEUED), (2, RUNNING), (3, SUCCEEDED)]);
    let times: Vec<_> = events
        .iter()
        .map(|e| {
            let t = e.time.unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(events.iter().all(|e| e.attempt == 1));

    let msg = expect_code(
        reader
            .get_history(GetHistoryRequest {
                id: Some(aid("h1", "missing")),
            })
            .await,
        Code::NotFound,
    );
    assert!(msg.contains("missing"), "{msg}");
    daemon.stop().await;
}

async fn next_message(
    stream: &mut tonic::Streaming<WatchRunResponse>,
) -> watch_run_response::Message {
    let message = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("a message in time")
        .expect("the stream is healthy")
        .expect("the stream goes on");
    message.message.expect("a message has content")
}

async fn watch_run_streams_the_whole_tree(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let mut reader = reader(&daemon).await;

    client.enqueue(task("w1", "a0", None)).await.unwrap();
    client.enqueue(task("w1", "a1", Some("a0"))).await.unwrap();
    client.enqueue(task("w1", "a2", Some("a1"))).await.unwrap();
    client.enqueue(task("w2", "a0", None)).await.unwrap();

    let mut stream = reader
        .watch_run(WatchRunRequest {
            run: Some(run_id("w1")),
        })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    loop {
        match next_message(&mut stream).await {
            watch_run_response::Message::Action(action) => snapshot.push(action),
            watch_run_response::Message::Sentinel(true) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The whole tree, grandchild included, with timestamps; nothing of w2.
    assert_eq!(names(&snapshot), ["a0", "a1", "a2"]);
    assert!(snapshot.iter().all(|a| a.created_at.is_some()));
    assert_eq!(snapshot[2].parent_name, "a1");

    // Live: a grandchild's change and a new great-grandchild.
    client
        .update(status_update("w1", "a2", 1, RUNNING))
        .await
        .unwrap();
    client.enqueue(task("w1", "a3", Some("a2"))).await.unwrap();
    client
        .update(status_update("w2", "a0", 1, RUNNING))
        .await
        .unwrap();
    let mut latest: HashMap<String, (u64, i32)> = HashMap::new();
    let mut seen_names = HashSet::new();
    while latest.get("a2") != Some(&(2, RUNNING)) || !latest.contains_key("a3") {
        let watch_run_response::Message::Action(action) = next_message(&mut stream).await else {
            panic!("a second sentinel");
        };
        let name = action.id.as_ref().unwrap().name.clone();
        assert_eq!(action.id.as_ref().unwrap().run, Some(run_id("w1")));
        if let Some((version, _)) = latest.get(&name) {
            assert!(action.version > *version, "went backwards: {action:?}");
        }
        seen_names.insert(name.clone());
        latest.insert(name, (action.version, action.phase));
    }
    assert_eq!(latest["a3"], (1, QUEUED));

    let msg = expect_code(
        reader
            .watch_run(WatchRunRequest {
                run: Some(run_id("nope")),
            })
            .await,
        Code::NotFound,
    );
    assert!(msg.contains("nope"), "{msg}");
    daemon.stop().await;
}

async fn read_api_over_connect_json(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("cj", "a0", None)).await.unwrap();

    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let call = |method: &str, body: &'static str| {
        http.post(format!(
            "http://{}/actionsd.read.v1.ReadService/{method}",
            daemon.addr
        ))
        .header("content-type", "application/json")
        .body(body)
        .send()
    };
    let response = call("ListRuns", "{}").await.unwrap();
    assert_eq!(response.status(), 200);
    let runs: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(runs["runs"][0]["id"]["name"], "cj");
    assert_eq!(runs["runs"][0]["phase"], "ACTION_PHASE_QUEUED");

    // The spec comes back under the official schema: a JSON object.
    let response = call(
        "GetAction",
        r#"{"id":{"run":{"project":"flytesnacks","domain":"development","name":"cj"},"name":"a0"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let action: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(action["action"]["kind"], "ACTION_KIND_TASK");
    assert_eq!(action["spec"]["task"]["id"]["name"], "tasks.a0");
    assert_eq!(
        action["spec"]["task"]["spec"]["taskTemplate"]["type"],
        "python-task"
    );

    let response = call("GetHistory", r#"{"id":{}}"#).await.unwrap();
    assert_eq!(response.status(), 400);
    let error: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(error["code"], "invalid_argument");
    daemon.stop().await;
}
