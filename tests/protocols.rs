//! One port, several protocols: Connect (JSON and binary, unary and
//! streaming, gzip, timeouts, error bodies), gRPC health and reflection.
//! The official clients are exercised by tests/interop.

mod common;

conformance!(
    connect_unary_json_and_binary,
    connect_errors_have_codes_and_http_statuses,
    connect_stream_snapshot_live_gzip_and_end_of_stream,
    reflection_lists_every_service,
);

use std::io::{Read, Write};
use std::time::Duration;

use actionsd::proto::flyteidl2::actions::{EnqueueRequest, WatchForUpdatesResponse};
use actionsd::proto::flyteidl2::core::{self, primitive};
use common::*;
use prost::Message;
use sqlx::PgPool;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ENQUEUE: &str = "flyteidl2.actions.ActionsService/Enqueue";
const UPDATE: &str = "flyteidl2.actions.ActionsService/Update";
const WATCH: &str = "flyteidl2.actions.ActionsService/WatchForUpdates";

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(TIMEOUT).build().unwrap()
}

fn url(daemon: &Daemon, path: &str) -> String {
    format!("http://{}/{path}", daemon.addr)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a Connect stream body into (flags, payload) envelopes.
fn envelopes(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + length].to_vec()));
        body = &body[5 + length..];
    }
    out
}

/// The proto3 JSON form of `task(run, "a0", None)`: the opaque TaskSpec is
/// a JSON object, as official JSON clients send it.
fn root_json(run: &str) -> String {
    format!(
        r#"{{"action":{{"actionId":{{"run":{{"project":"flytesnacks","domain":"development","name":"{run}"}},"name":"a0"}},
           "inputUri":"s3://bucket/{run}/a0/inputs.pb","runOutputBase":"s3://bucket/{run}",
           "task":{{"id":{{"project":"flytesnacks","domain":"development","name":"tasks.a0","version":"v1"}},
                    "spec":{{"taskTemplate":{{"type":"python-task"}},"shortName":"hello"}}}}}}}}"#
    )
}

fn parent_json(run: &str, name: &str) -> String {
    format!(
        r#"{{"parentActionId":{{"run":{{"project":"flytesnacks","domain":"development","name":"{run}"}},"name":"{name}"}}}}"#
    )
}

async fn connect_unary_json_and_binary(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let http = http();

    // JSON, with the proto3 JSON mapping (bytes as base64).
    let response = http
        .post(url(&daemon, ENQUEUE))
        .header("content-type", "application/json")
        .body(root_json("cj1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "{}");

    // Binary, gzip-compressed, as the Flyte SDK sends it.
    let child: EnqueueRequest = task("cj1", "a1", Some("a0"));
    let response = http
        .post(url(&daemon, ENQUEUE))
        .header("content-type", "application/proto")
        .header("content-encoding", "gzip")
        .header("x-actions-run", "cj1")
        .header("x-request-id", "req-1")
        .body(gzip(&child.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty());

    // Both are visible to a gRPC watcher: one store, one service.
    let mut client = daemon.client().await;
    let snapshot = phases(&mut client, "cj1", "a0").await;
    assert_eq!(snapshot.len(), 2);
    // The JSON enqueue stored the same content a binary one would: an
    // identical re-enqueue over gRPC is idempotent.
    client.enqueue(task("cj1", "a0", None)).await.unwrap();
    daemon.stop().await;
}

async fn connect_errors_have_codes_and_http_statuses(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let http = http();
    let call = |path: &'static str, content_type: &'static str, body: Vec<u8>| {
        let request = http
            .post(url(&daemon, path))
            .header("content-type", content_type)
            .body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            (status, body["code"].as_str().unwrap().to_owned(), body)
        }
    };
    let update = br#"{"actionId":{"run":{"project":"flytesnacks","domain":"development","name":"ce1"},"name":"x"},"attempt":1,"status":{"phase":"ACTION_PHASE_RUNNING"}}"#;
    let (status, code, body) = call(UPDATE, "application/json", update.to_vec()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"), "{body}");
    assert!(body["message"].as_str().unwrap().contains("not found"));

    let (status, code, _) = call(ENQUEUE, "application/json", b"{\"action\":".to_vec()).await;
    assert_eq!((status, code.as_str()), (400, "invalid_argument"));
    let (status, code, body) = call(ENQUEUE, "application/json", b"{}".to_vec()).await;
    assert_eq!((status, code.as_str()), (400, "invalid_argument"));
    assert_eq!(body["message"], "action: is required");

    let created = http
        .post(url(&daemon, ENQUEUE))
        .header("content-type", "application/json")
        .body(root_json("ce1"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let mut conflicting = root_json("ce1");
    conflicting = conflicting.replace("inputs.pb", "other.pb");
    let (status, code, _) = call(ENQUEUE, "application/json", conflicting.into_bytes()).await;
    assert_eq!((status, code.as_str()), (409, "already_exists"));

    // Over the message limit. The answer comes before the body is read;
    // over HTTP/2 (h2c) the connection survives that, over HTTP/1.1 the
    // server has to close it.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(TIMEOUT)
        .build()
        .unwrap();
    let response = h2c
        .post(url(&daemon, ENQUEUE))
        .header("content-type", "application/json")
        .body(vec![b' '; 5 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["code"], "resource_exhausted");

    // Unsupported compression.
    let response = http
        .post(url(&daemon, ENQUEUE))
        .header("content-type", "application/json")
        .header("content-encoding", "br")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501);
    daemon.stop().await;
}

async fn connect_stream_snapshot_live_gzip_and_end_of_stream(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("cs1", "a0", None)).await.unwrap();
    client
        .enqueue(condition("cs1", "ask", "a0", core::SimpleType::String))
        .await
        .unwrap();
    // A value large enough to be compressed on the way out.
    let long = "y".repeat(4096);
    client
        .signal(signal(
            "cs1",
            "ask",
            "a0",
            primitive::Value::StringValue(long.clone()),
        ))
        .await
        .unwrap();

    let http = http();
    let request = watch_request("cs1", "a0").encode_to_vec();
    // Binary codec, gzip accepted, bounded by connect-timeout-ms: the stream
    // ends with deadline_exceeded in its end-of-stream message.
    let response = http
        .post(url(&daemon, WATCH))
        .header("content-type", "application/connect+proto")
        .header("connect-accept-encoding", "gzip")
        .header("connect-timeout-ms", "500")
        .body(envelope(0, &request))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connect-content-encoding"], "gzip");
    let frames = envelopes(&response.bytes().await.unwrap());
    assert_eq!(frames.len(), 4, "parent, child, sentinel, end of stream");
    let decode = |(flags, payload): &(u8, Vec<u8>)| {
        let payload = if flags & 1 == 1 {
            gunzip(payload)
        } else {
            payload.clone()
        };
        classify(WatchForUpdatesResponse::decode(payload.as_slice()).unwrap())
    };
    assert!(matches!(decode(&frames[0]), Msg::Update(u) if u.phase == QUEUED));
    assert_eq!(frames[1].0, 1, "the large update is compressed");
    match decode(&frames[1]) {
        Msg::Update(u) => assert_eq!(
            u.value,
            Some(primitive_literal(primitive::Value::StringValue(long)))
        ),
        Msg::Sentinel => panic!("expected the condition"),
    }
    assert!(matches!(decode(&frames[2]), Msg::Sentinel));
    assert_eq!(frames[3].0, 2);
    let end: serde_json::Value = serde_json::from_slice(&frames[3].1).unwrap();
    assert_eq!(end["error"]["code"], "deadline_exceeded");

    // JSON codec; an unknown parent ends the stream at once with not_found.
    let request = parent_json("cs1", "nope");
    let response = http
        .post(url(&daemon, WATCH))
        .header("content-type", "application/connect+json")
        .body(envelope(0, request.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let frames = envelopes(&response.bytes().await.unwrap());
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, 2);
    let end: serde_json::Value = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!(end["error"]["code"], "not_found");

    // A live update reaches a Connect stream (JSON, gzip-compressed request).
    let request = parent_json("cs1", "a0");
    let mut response = http
        .post(url(&daemon, WATCH))
        .header("content-type", "application/connect+json")
        .header("connect-content-encoding", "gzip")
        .body(envelope(1, &gzip(request.as_bytes())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let mut updated = false;
    let live = loop {
        let chunk = tokio::time::timeout(TIMEOUT, response.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream stays open");
        received.extend_from_slice(&chunk);
        let frames = envelopes_complete(&received);
        if !updated
            && frames
                .iter()
                .any(|f| String::from_utf8_lossy(&f.1).contains("sentinel"))
        {
            client
                .enqueue(task("cs1", "late", Some("a0")))
                .await
                .unwrap();
            updated = true;
        }
        if let Some(frame) = frames
            .iter()
            .find(|f| String::from_utf8_lossy(&f.1).contains("\"late\""))
        {
            break String::from_utf8(frame.1.clone()).unwrap();
        }
    };
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["actionUpdate"]["phase"], "ACTION_PHASE_QUEUED");
    daemon.stop().await;
}

/// The complete envelopes at the start of a partial body.
fn envelopes_complete(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        if body.len() < 5 + length {
            break;
        }
        out.push((body[0], body[5..5 + length].to_vec()));
        body = &body[5 + length..];
    }
    out
}

async fn health_status(daemon: &Daemon, service: &str) -> ServingStatus {
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

#[sqlx::test(migrations = "migrations/postgres")]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn health_follows_the_database(pool: PgPool) {
    let daemon = Daemon::start(&TestDb::postgres(pool.clone())).await;
    assert_eq!(health_status(&daemon, "").await, ServingStatus::Serving);
    assert_eq!(
        health_status(&daemon, "flyteidl2.actions.ActionsService").await,
        ServingStatus::Serving
    );

    set_database_reachable(&pool, false).await;
    wait_for_health(&daemon, ServingStatus::NotServing).await;
    set_database_reachable(&pool, true).await;
    wait_for_health(&daemon, ServingStatus::Serving).await;
    daemon.stop().await;
}

async fn wait_for_health(daemon: &Daemon, expected: ServingStatus) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while health_status(daemon, "").await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reflection_lists_every_service(db: TestDb) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let daemon = Daemon::start(&db).await;
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol(
                "flyteidl2.actions.ActionsService".into(),
            )),
            request(MessageRequest::FileContainingSymbol(
                "flyteidl2.dataproxy.DataProxyService".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let listed = match responses.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("unexpected {other:?}"),
    };
    for service in [
        "flyteidl2.actions.ActionsService",
        "actionsd.executor.v1.ExecutorService",
        "actionsd.read.v1.ReadService",
        "flyteidl2.workflow.RunService",
        "flyteidl2.dataproxy.DataProxyService",
        "flyteidl2.cluster.ClusterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            listed.iter().any(|s| s == service),
            "{service} missing from {listed:?}"
        );
    }
    match responses.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty())
        }
        other => panic!("unexpected {other:?}"),
    }
    // The data proxy is described with the methods the SDK calls.
    let methods = match responses.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                <prost_types::FileDescriptorProto as prost::Message>::decode(&bytes[..]).unwrap()
            })
            .flat_map(|file| file.service)
            .filter(|service| service.name() == "DataProxyService")
            .flat_map(|service| service.method)
            .map(|method| method.name().to_owned())
            .collect::<Vec<_>>(),
        other => panic!("unexpected {other:?}"),
    };
    for method in [
        "CreateUploadLocation",
        "UploadInputs",
        "CreateDownloadLink",
        "GetActionData",
        "TailLogs",
    ] {
        assert!(
            methods.iter().any(|m| m == method),
            "{method} missing from {methods:?}"
        );
    }
    daemon.stop().await;
}
