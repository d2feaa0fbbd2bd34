//! The Flyte SDK's services (RunService, DataProxyService, ClusterService)
//! and the executor's log shipping, through real gRPC clients and real
//! HTTP uploads, on both stores. The Flyte SDK itself drives the same
//! services in tests/flyte/.

mod common;

use std::path::{Path, PathBuf};

use actionsd::blob::BlobLocation;
use actionsd::proto::actionsd::executor::v1::{
    lease_response, AppendLogsRequest, FinishRequest, LeaseRequest, LeasedAction,
};
use actionsd::proto::flyteidl2::cluster::cluster_service_client::ClusterServiceClient;
use actionsd::proto::flyteidl2::cluster::SelectClusterRequest;
use actionsd::proto::flyteidl2::common::{
    ActionAttemptIdentifier, ActionIdentifier, ListRequest, OffloadedInputData, ProjectIdentifier,
    RunIdentifier,
};
use actionsd::proto::flyteidl2::core::{execution_error, ExecutionError, Identifier, TaskTemplate};
use actionsd::proto::flyteidl2::dataproxy::data_proxy_service_client::DataProxyServiceClient;
use actionsd::proto::flyteidl2::dataproxy::{
    create_download_link_request, upload_inputs_request, ArtifactType, CreateDownloadLinkRequest,
    CreateUploadLocationRequest, GetActionDataRequest, TailLogsRequest, UploadInputsRequest,
};
use actionsd::proto::flyteidl2::logs::dataplane::LogLine;
use actionsd::proto::flyteidl2::task::TaskSpec;
use actionsd::proto::flyteidl2::workflow::run_service_client::RunServiceClient;
use actionsd::proto::flyteidl2::workflow::{
    action_details, create_run_request, list_runs_request, AbortRunRequest, CreateRunRequest,
    GetActionDetailsRequest, GetRunDetailsRequest, ListRunsRequest, WatchActionDetailsRequest,
};
use base64::Engine as _;
use bytes::Bytes;
use common::{Daemon, TestDb, ABORTED, FAILED, QUEUED, SUCCEEDED, TIMEOUT};
use md5::Digest as _;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

/// The part of a RunSpec this test sets: its queue (field 6).
#[derive(Clone, PartialEq, Message)]
struct RunSpecQueue {
    #[prost(string, tag = "6")]
    queue: String,
}

/// A TaskSpec whose container unpacks a code bundle: the fields of
/// TaskSpec.task_template (1), TaskTemplate.type (2) and .container (6),
/// and Container.args (3) of the official protos.
#[derive(Clone, PartialEq, Message)]
struct BundleTaskSpec {
    #[prost(message, optional, tag = "1")]
    template: Option<BundleTemplate>,
}

#[derive(Clone, PartialEq, Message)]
struct BundleTemplate {
    #[prost(string, tag = "2")]
    r#type: String,
    #[prost(message, optional, tag = "6")]
    container: Option<BundleContainer>,
}

#[derive(Clone, PartialEq, Message)]
struct BundleContainer {
    #[prost(string, repeated, tag = "3")]
    args: Vec<String>,
}

struct Clients {
    runs: RunServiceClient<Channel>,
    data: DataProxyServiceClient<Channel>,
    clusters: ClusterServiceClient<Channel>,
    executor: common::ExecutorClient,
}

async fn clients(daemon: &Daemon) -> Clients {
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Clients {
        runs: RunServiceClient::new(channel.clone()),
        data: DataProxyServiceClient::new(channel.clone()),
        clusters: ClusterServiceClient::new(channel),
        executor: daemon.executor_client().await,
    }
}

async fn start(db: &TestDb, blobs: &Path, max_log: Option<u64>) -> Daemon {
    let blobs = blobs.to_owned();
    Daemon::start_with(db, move |config| {
        config.blobs.location = Some(BlobLocation::Local(blobs));
        if let Some(max) = max_log {
            config.blobs.limits.max_attempt_log_bytes = max;
        }
    })
    .await
}

fn project() -> ProjectIdentifier {
    ProjectIdentifier {
        organization: "127".into(),
        domain: "development".into(),
        name: "flytesnacks".into(),
    }
}

fn task_spec() -> Bytes {
    Bytes::from(
        TaskSpec {
            task_template: Some(TaskTemplate {
                id: Some(Identifier {
                    resource_type: 1,
                    project: "flytesnacks".into(),
                    domain: "development".into(),
                    name: "wf.main".into(),
                    version: "v1".into(),
                    org: "127".into(),
                }),
                r#type: "python".into(),
            }),
            short_name: "main".into(),
        }
        .encode_to_vec(),
    )
}

async fn create_run(c: &mut Clients, queue: &str, inputs: Bytes) -> RunIdentifier {
    create_run_of(c, queue, inputs, task_spec()).await
}

async fn create_run_of(c: &mut Clients, queue: &str, inputs: Bytes, spec: Bytes) -> RunIdentifier {
    let offloaded = c
        .data
        .upload_inputs(UploadInputsRequest {
            id: Some(upload_inputs_request::Id::ProjectId(project())),
            inputs,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .offloaded_input_data
        .unwrap();
    let run = c
        .runs
        .create_run(CreateRunRequest {
            id: Some(create_run_request::Id::ProjectId(project())),
            task: Some(create_run_request::Task::TaskSpec(spec)),
            input_wrapper: Some(create_run_request::InputWrapper::OffloadedInputData(
                offloaded,
            )),
            run_spec: Bytes::from(
                RunSpecQueue {
                    queue: queue.into(),
                }
                .encode_to_vec(),
            ),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let action = run.action.unwrap();
    assert_eq!(action.status.unwrap().phase, QUEUED);
    let id = action.id.unwrap();
    assert_eq!(id.name, "a0");
    id.run.unwrap()
}

fn root(run: &RunIdentifier) -> ActionIdentifier {
    ActionIdentifier {
        run: Some(run.clone()),
        name: "a0".into(),
    }
}

/// Leases the next action of `queue` as `executor`.
async fn lease(c: &mut Clients, executor: &str, queue: &str) -> LeasedAction {
    let mut stream = c
        .executor
        .lease(LeaseRequest {
            executor_id: executor.into(),
            queue: queue.into(),
            capacity: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let message = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("a lease in time")
        .unwrap()
        .unwrap();
    match message.event {
        Some(lease_response::Event::Leased(leased)) => leased,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn lines(texts: &[&str]) -> Vec<LogLine> {
    texts
        .iter()
        .map(|t| LogLine {
            message: (*t).to_owned(),
            originator: 1,
            ..Default::default()
        })
        .collect()
}

async fn append(
    c: &mut Clients,
    executor: &str,
    leased: &LeasedAction,
    sequence: u32,
    texts: &[&str],
) -> Result<bool, tonic::Status> {
    c.executor
        .append_logs(AppendLogsRequest {
            executor_id: executor.into(),
            action_id: leased.action_id.clone(),
            attempt: leased.attempt,
            sequence,
            lines: lines(texts),
        })
        .await
        .map(|r| r.into_inner().truncated)
}

async fn finish(
    c: &mut Clients,
    executor: &str,
    leased: &LeasedAction,
    phase: i32,
    error: Option<ExecutionError>,
) {
    c.executor
        .finish(FinishRequest {
            executor_id: executor.into(),
            action_id: leased.action_id.clone(),
            attempt: leased.attempt,
            phase,
            output_uri: String::new(),
            error,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn flyte_run_lifecycle(db: TestDb) {
    let blob_dir = tempfile::tempdir().unwrap();
    let daemon = start(&db, blob_dir.path(), None).await;
    let mut c = clients(&daemon).await;
    let http = reqwest::Client::new();

    // One endpoint: an empty answer means "this one".
    let cluster = c
        .clusters
        .select_cluster(SelectClusterRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cluster.cluster_endpoint.is_empty());

    // A code bundle goes up through a signed URL served on the same port.
    let bundle = b"a code bundle".to_vec();
    let md5 = md5::Md5::digest(&bundle).to_vec();
    let location = c
        .data
        .create_upload_location(CreateUploadLocationRequest {
            project: "flytesnacks".into(),
            domain: "development".into(),
            org: "127".into(),
            filename: "fastabc.tar.gz".into(),
            content_md5: md5.clone().into(),
            content_length: bundle.len() as i64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        location
            .signed_url
            .starts_with(&format!("http://{}/", daemon.addr)),
        "{}",
        location.signed_url
    );
    let native = PathBuf::from(&location.native_url);
    assert!(
        native.starts_with(blob_dir.path().canonicalize().unwrap()),
        "{native:?}"
    );
    let content_md5 = base64::engine::general_purpose::STANDARD.encode(&md5);
    let put = |url: String, body: Vec<u8>| {
        http.put(url)
            .header("Content-MD5", content_md5.clone())
            .body(body)
            .send()
    };
    // Other content of the same length, a tampered URL and a larger body
    // are refused; nothing is written.
    let other = b"another bundl".to_vec();
    assert_eq!(other.len(), bundle.len());
    assert_eq!(
        put(location.signed_url.clone(), other)
            .await
            .unwrap()
            .status(),
        400
    );
    let tampered = location.signed_url.replace("&n=", "&n=1");
    assert_eq!(put(tampered, bundle.clone()).await.unwrap().status(), 403);
    let mut larger = bundle.clone();
    larger.push(b'!');
    assert_eq!(
        put(location.signed_url.clone(), larger)
            .await
            .unwrap()
            .status(),
        413
    );
    assert!(!native.exists());
    assert_eq!(
        put(location.signed_url.clone(), bundle.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(std::fs::read(&native).unwrap(), bundle);

    // Create a run: the root a0 is queued with the stored RunSpec.
    let inputs = Bytes::from_static(b"\x0a\x05\x0a\x01n\x12\x00");
    let run = create_run(&mut c, "flyte-life", inputs.clone()).await;
    assert!(
        run.name.starts_with('r') && run.name.len() == 20,
        "{}",
        run.name
    );
    let details = c
        .runs
        .get_run_details(GetRunDetailsRequest {
            run_id: Some(run.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .details
        .unwrap();
    assert_eq!(
        RunSpecQueue::decode(details.run_spec).unwrap().queue,
        "flyte-life"
    );
    let action = details.action.unwrap();
    assert_eq!(action.spec, Some(action_details::Spec::Task(task_spec())));
    let listed = c
        .runs
        .list_runs(ListRunsRequest {
            request: Some(ListRequest {
                limit: 10,
                ..Default::default()
            }),
            scope_by: Some(list_runs_request::ScopeBy::ProjectId(project())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.iter().any(|r| r
        .action
        .as_ref()
        .unwrap()
        .id
        .as_ref()
        .unwrap()
        .run
        .as_ref()
        == Some(&run)));

    // An executor leases a0 and ships its output; TailLogs streams it live.
    let leased = lease(&mut c, "exec-1", "flyte-life").await;
    assert_eq!(leased.action_id.as_ref().unwrap().name, "a0");
    assert!(!append(&mut c, "exec-1", &leased, 0, &["hello from a0"])
        .await
        .unwrap());
    let mut tail = c
        .data
        .tail_logs(TailLogsRequest {
            action_id: Some(root(&run)),
            attempt: leased.attempt,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let next_line = |m: Option<actionsd::proto::flyteidl2::dataproxy::TailLogsResponse>| {
        m.unwrap().logs[0].lines[0].message.clone()
    };
    let first = tokio::time::timeout(TIMEOUT, tail.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next_line(first), "hello from a0");
    assert!(!append(&mut c, "exec-1", &leased, 1, &["still running"])
        .await
        .unwrap());
    let second = tokio::time::timeout(TIMEOUT, tail.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next_line(second), "still running");
    let running = c
        .runs
        .get_action_details(GetActionDetailsRequest {
            action_id: Some(root(&run)),
        })
        .await
        .unwrap()
        .into_inner()
        .details
        .unwrap();
    assert!(running.attempts.last().unwrap().logs_available);

    // Outputs go to the lease's output location in the shared store.
    let outputs = Bytes::from_static(b"\x0a\x06\x0a\x02o0\x12\x00");
    let out_dir = PathBuf::from(&leased.output_uri);
    assert!(
        out_dir.starts_with(blob_dir.path().canonicalize().unwrap()),
        "{out_dir:?}"
    );
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("outputs.pb"), &outputs).unwrap();
    let mut watch = c
        .runs
        .watch_action_details(WatchActionDetailsRequest {
            action_id: Some(root(&run)),
        })
        .await
        .unwrap()
        .into_inner();
    finish(&mut c, "exec-1", &leased, SUCCEEDED, None).await;
    // The tail and the watch both end once the action is over.
    assert!(tokio::time::timeout(TIMEOUT, tail.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    let mut last = None;
    while let Some(message) = tokio::time::timeout(TIMEOUT, watch.message())
        .await
        .unwrap()
        .unwrap()
    {
        last = message.details;
    }
    assert_eq!(last.unwrap().status.unwrap().phase, SUCCEEDED);

    // The data of the action, read by the daemon from the store.
    let data = c
        .data
        .get_action_data(GetActionDataRequest {
            action_id: Some(root(&run)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(data.inputs, inputs);
    assert_eq!(data.outputs, outputs);
    daemon.stop().await;
}

async fn failing_and_aborted_runs(db: TestDb) {
    let blob_dir = tempfile::tempdir().unwrap();
    let daemon = start(&db, blob_dir.path(), None).await;
    let mut c = clients(&daemon).await;

    // A failed run reports the user's error.
    let run = create_run(&mut c, "flyte-fail", Bytes::new()).await;
    let leased = lease(&mut c, "exec-1", "flyte-fail").await;
    let error = ExecutionError {
        code: "ValueError".into(),
        message: "ValueError: n must be positive".into(),
        kind: execution_error::ErrorKind::User as i32,
        ..Default::default()
    };
    finish(&mut c, "exec-1", &leased, FAILED, Some(error)).await;
    let action = c
        .runs
        .get_run_details(GetRunDetailsRequest {
            run_id: Some(run.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .details
        .unwrap()
        .action
        .unwrap();
    assert_eq!(action.status.unwrap().phase, FAILED);
    match action.result {
        Some(action_details::Result::ErrorInfo(info)) => {
            assert_eq!(info.message, "ValueError: n must be positive");
            assert_eq!(info.kind, 1);
        }
        other => panic!("expected error info, got {other:?}"),
    }

    // An aborted run says why.
    let run = create_run(&mut c, "flyte-abort", Bytes::new()).await;
    c.runs
        .abort_run(AbortRunRequest {
            run_id: Some(run.clone()),
            reason: Some("not needed".into()),
        })
        .await
        .unwrap();
    let action = c
        .runs
        .get_action_details(GetActionDetailsRequest {
            action_id: Some(root(&run)),
        })
        .await
        .unwrap()
        .into_inner()
        .details
        .unwrap();
    assert_eq!(action.status.unwrap().phase, ABORTED);
    match action.result {
        Some(action_details::Result::AbortInfo(info)) => assert_eq!(info.reason, "not needed"),
        other => panic!("expected abort info, got {other:?}"),
    }

    // What is not supported says so.
    let unknown = RunIdentifier {
        name: "rnosuchrun".into(),
        ..run.clone()
    };
    let err = c
        .runs
        .abort_run(AbortRunRequest {
            run_id: Some(unknown),
            reason: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .runs
        .create_run(CreateRunRequest {
            id: Some(create_run_request::Id::ProjectId(project())),
            task: Some(create_run_request::Task::TaskId(Bytes::from_static(
                b"\x22\x01x",
            ))),
            input_wrapper: Some(create_run_request::InputWrapper::OffloadedInputData(
                OffloadedInputData {
                    uri: "/x/inputs.pb".into(),
                    inputs_hash: String::new(),
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("registered task"),
        "{}",
        err.message()
    );
    let err = c
        .runs
        .list_runs(ListRunsRequest {
            request: Some(ListRequest {
                filters: vec![Bytes::from_static(b"\x08\x01")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    daemon.stop().await;
}

async fn logs_are_bounded_and_belong_to_the_lease(db: TestDb) {
    let blob_dir = tempfile::tempdir().unwrap();
    let daemon = start(&db, blob_dir.path(), Some(64)).await;
    let mut c = clients(&daemon).await;
    create_run(&mut c, "flyte-logs", Bytes::new()).await;
    let leased = lease(&mut c, "exec-1", "flyte-logs").await;
    let err = append(&mut c, "exec-2", &leased, 0, &["not mine"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let forty = "x".repeat(40);
    assert!(!append(&mut c, "exec-1", &leased, 0, &[&forty])
        .await
        .unwrap());
    // Resending a chunk replaces it rather than counting twice.
    assert!(!append(&mut c, "exec-1", &leased, 0, &[&forty])
        .await
        .unwrap());
    // 40 + 40 bytes exceed the 64-byte bound: dropped, and the executor is told.
    assert!(append(&mut c, "exec-1", &leased, 1, &[&forty])
        .await
        .unwrap());
    daemon.stop().await;
}

async fn shipped_output_is_tailed(db: TestDb) {
    use actionsd::executor::ship::LogShipper;
    use actionsd::proto::actionsd::executor::v1::executor_service_client::ExecutorServiceClient;
    let blob_dir = tempfile::tempdir().unwrap();
    let daemon = start(&db, blob_dir.path(), None).await;
    let mut c = clients(&daemon).await;
    let run = create_run(&mut c, "flyte-ship", Bytes::new()).await;
    let leased = lease(&mut c, "exec-1", "flyte-ship").await;
    // The executor's clients carry its (here: no) bearer token.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let executor = ExecutorServiceClient::new(
        actionsd::client::ClientSecurity::default()
            .wrap(channel)
            .unwrap(),
    );
    let (shipper, task) = LogShipper::start(
        executor,
        "exec-1".into(),
        leased.action_id.clone().unwrap(),
        leased.attempt,
    );
    // Output arrives in pieces that do not respect line ends.
    for piece in [
        &b"first li"[..],
        b"ne\nsecond line\nthird",
        b" line, no newline",
    ] {
        assert!(shipper.write_chunk(piece));
    }
    drop(shipper);
    let stats = task.finish(TIMEOUT).await;
    assert_eq!((stats.lines_sent, stats.lines_dropped), (3, 0));
    finish(&mut c, "exec-1", &leased, SUCCEEDED, None).await;
    let mut tail = c
        .data
        .tail_logs(TailLogsRequest {
            action_id: Some(root(&run)),
            attempt: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(message) = tokio::time::timeout(TIMEOUT, tail.message())
        .await
        .unwrap()
        .unwrap()
    {
        for logs in message.logs {
            seen.extend(logs.lines.into_iter().map(|l| l.message));
        }
    }
    assert_eq!(
        seen,
        ["first line\n", "second line\n", "third line, no newline\n"]
    );
    daemon.stop().await;
}

/// A signed download link for an action attempt's `artifact`, expiring in
/// `expires_in` seconds (0: the default); `None` when there is none.
async fn download_link(
    c: &mut Clients,
    action: &ActionIdentifier,
    attempt: u32,
    artifact: ArtifactType,
    expires_in: i64,
) -> Option<String> {
    let links = c
        .data
        .create_download_link(CreateDownloadLinkRequest {
            artifact_type: artifact as i32,
            expires_in: (expires_in > 0).then_some(prost_types::Duration {
                seconds: expires_in,
                nanos: 0,
            }),
            source: Some(create_download_link_request::Source::ActionAttemptId(
                ActionAttemptIdentifier {
                    action_id: Some(action.clone()),
                    attempt,
                },
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .pre_signed_urls
        .unwrap();
    assert!(links.signed_url.len() <= 1, "{links:?}");
    assert!(links.expires_at.is_some());
    links.signed_url.into_iter().next()
}

async fn signed_links_read_reports_and_bundles_and_expire(db: TestDb) {
    let blob_dir = tempfile::tempdir().unwrap();
    let daemon = start(&db, blob_dir.path(), None).await;
    let mut c = clients(&daemon).await;
    let http = reqwest::Client::new();

    // A code bundle, uploaded; a short-lived upload URL for another object.
    let bundle = b"bundle bytes".to_vec();
    let md5 = md5::Md5::digest(&bundle).to_vec();
    let location = |filename: &str, expires: i64| CreateUploadLocationRequest {
        project: "flytesnacks".into(),
        domain: "development".into(),
        filename: filename.into(),
        content_md5: md5.clone().into(),
        expires_in: (expires > 0).then_some(prost_types::Duration {
            seconds: expires,
            nanos: 0,
        }),
        ..Default::default()
    };
    let upload = c
        .data
        .create_upload_location(location("fast.tar.gz", 0))
        .await
        .unwrap()
        .into_inner();
    let short_upload = c
        .data
        .create_upload_location(location("late.tar.gz", 1))
        .await
        .unwrap()
        .into_inner();
    let status = http
        .put(&upload.signed_url)
        .body(bundle.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);

    // A run whose task unpacks that bundle; its attempt writes a report.
    let spec = BundleTaskSpec {
        template: Some(BundleTemplate {
            r#type: "python".into(),
            container: Some(BundleContainer {
                args: vec![
                    "a0".into(),
                    "--tgz".into(),
                    upload.native_url.clone(),
                    "--dest".into(),
                    ".".into(),
                ],
            }),
        }),
    };
    let inputs = Bytes::from_static(b"\x0a\x05\x0a\x01n\x12\x00");
    let run = create_run_of(&mut c, "links", inputs, Bytes::from(spec.encode_to_vec())).await;
    let action = root(&run);
    let leased = lease(&mut c, "exec-links", "links").await;
    // No report yet: no link, as the SDK expects.
    assert_eq!(
        download_link(&mut c, &action, leased.attempt, ArtifactType::Report, 0).await,
        None
    );
    let report = b"<html>report</html>".to_vec();
    let out_dir = PathBuf::from(&leased.output_uri);
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("report.html"), &report).unwrap();
    finish(&mut c, "exec-links", &leased, SUCCEEDED, None).await;

    let get = |url: String| {
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.bytes().await.unwrap())
        }
    };
    let report_url = download_link(&mut c, &action, leased.attempt, ArtifactType::Report, 0)
        .await
        .expect("a report link");
    assert!(
        report_url.starts_with(&format!("http://{}/blobs/v1/download?", daemon.addr)),
        "{report_url}"
    );
    assert_eq!(get(report_url.clone()).await, (200, Bytes::from(report)));
    // Attempt 0 means the latest.
    assert!(download_link(&mut c, &action, 0, ArtifactType::Report, 0)
        .await
        .is_some());
    let bundle_url = download_link(&mut c, &action, 0, ArtifactType::CodeBundle, 0)
        .await
        .expect("a code bundle link");
    assert_eq!(
        get(bundle_url.clone()).await,
        (200, Bytes::from(bundle.clone()))
    );

    // A link names one object until it expires: another key, another
    // expiry or another signature is refused, as is an upload signature.
    let swapped = {
        let (head, tail) = report_url.split_once("k=").unwrap();
        let (_, rest) = tail.split_once('&').unwrap();
        let bundle_key = bundle_url
            .split_once("k=")
            .unwrap()
            .1
            .split_once('&')
            .unwrap()
            .0;
        format!("{head}k={bundle_key}&{rest}")
    };
    assert_eq!(get(swapped).await.0, 403);
    let later = {
        let (head, tail) = report_url.split_once("&e=").unwrap();
        let (expires, rest) = tail.split_once('&').unwrap();
        format!("{head}&e={}&{rest}", expires.parse::<i64>().unwrap() + 60)
    };
    assert_eq!(get(later).await.0, 403);
    let (head, signature) = report_url.rsplit_once("&s=").unwrap();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    assert_eq!(
        get(format!("{head}&s={flipped}{}", &signature[1..]))
            .await
            .0,
        403
    );
    let upload_signature = upload.signed_url.rsplit_once("&s=").unwrap().1;
    assert_eq!(get(format!("{head}&s={upload_signature}")).await.0, 403);
    // PUT on a download URL is not an upload.
    let status = http
        .put(&report_url)
        .body("x")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 405);

    // Short-lived links: good now, refused once their second has passed.
    let short_report = download_link(&mut c, &action, 0, ArtifactType::Report, 1)
        .await
        .unwrap();
    let expires: i64 = short_report
        .split_once("&e=")
        .unwrap()
        .1
        .split_once('&')
        .unwrap()
        .0
        .parse()
        .unwrap();
    assert!(expires <= chrono::Utc::now().timestamp() + 1, "{expires}");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while chrono::Utc::now().timestamp() <= expires {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(get(short_report).await.0, 403);
    let status = http
        .put(&short_upload.signed_url)
        .body(bundle.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403);
    assert!(!PathBuf::from(&short_upload.native_url).exists());

    // Bad requests name the problem.
    let refused = c
        .data
        .create_download_link(CreateDownloadLinkRequest {
            artifact_type: ArtifactType::Report as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("source"),
        "{}",
        refused.message()
    );
    let refused = c
        .data
        .create_download_link(CreateDownloadLinkRequest {
            artifact_type: ArtifactType::Unspecified as i32,
            source: Some(create_download_link_request::Source::ActionAttemptId(
                ActionAttemptIdentifier {
                    action_id: Some(action.clone()),
                    attempt: 1,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("artifact_type"),
        "{}",
        refused.message()
    );
    daemon.stop().await;
}

conformance!(
    signed_links_read_reports_and_bundles_and_expire,
    shipped_output_is_tailed,
    flyte_run_lifecycle,
    failing_and_aborted_runs,
    logs_are_bounded_and_belong_to_the_lease
);
