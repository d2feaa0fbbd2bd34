//! Authentication and authorization through real gRPC, gRPC-Web and
//! Connect requests: the RPC × role matrix on each protocol, expired and
//! forged tokens, the token endpoint, OIDC through a JWKS served here,
//! run-scoped task credentials, identity in the record, and the abuse
//! limits.
//!
//! The three protocols are spoken by hand (hyper) so each refusal is read
//! in its own wire format: gRPC trailers, gRPC-Web trailer frames,
//! Connect's HTTP status and JSON error or end-of-stream message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use actionsd::auth::config::{ClientEntry, Limits, TokenEntry};
use actionsd::auth::{AuthSettings, Role, Scope};
use actionsd::config::Config;
use bytes::Bytes;
use common::{Daemon, TestDb, TIMEOUT};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use sha2::Digest;
use tonic::Code;

const SIGNING_KEY: &str = "test-signing-key-of-at-least-32-bytes!!";
const RUN: &str = "r1";

/// The static tokens of the test principals, by role.
const READER: &str = "reader-token-0123456789";
const USER: &str = "user-token-0123456789";
const EXECUTOR: &str = "executor-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
/// A user confined to the project `other`.
const OTHER_USER: &str = "other-user-token-0123456789";
/// An executor confined to the queue `q1`.
const Q1_EXECUTOR: &str = "q1-executor-token-0123456789";
/// A second executor principal on every queue.
const EXECUTOR_2: &str = "second-executor-token-0123456789";
const CLIENT_ID: &str = "ci";
const CLIENT_SECRET: &str = "ci-secret with spaces+plus";

fn token(name: &str, secret: &str, role: Role, scope: Scope) -> TokenEntry {
    TokenEntry {
        name: name.to_owned(),
        sha256: sha2::Sha256::digest(secret.as_bytes()).into(),
        role,
        scope,
    }
}

fn settings(limits: Limits) -> AuthSettings {
    AuthSettings {
        signing_key: Some(SIGNING_KEY.to_owned().into()),
        issuer: "actionsd-test".to_owned(),
        token_ttl: Duration::from_secs(600),
        task_credential_ttl: Duration::from_secs(3600),
        public_url: None,
        tokens: vec![
            token("reader", READER, Role::Reader, Scope::default()),
            token("user", USER, Role::User, Scope::default()),
            token("executor", EXECUTOR, Role::Executor, Scope::default()),
            token("executor-2", EXECUTOR_2, Role::Executor, Scope::default()),
            token("admin", ADMIN, Role::Admin, Scope::default()),
            token(
                "other-user",
                OTHER_USER,
                Role::User,
                Scope {
                    projects: vec!["other".into()],
                    ..Scope::default()
                },
            ),
            token(
                "q1-executor",
                Q1_EXECUTOR,
                Role::Executor,
                Scope {
                    queues: vec!["q1".into()],
                    ..Scope::default()
                },
            ),
        ],
        clients: vec![ClientEntry {
            client_id: CLIENT_ID.to_owned(),
            secret_hash: actionsd::auth::hash_secret(CLIENT_SECRET, false).unwrap(),
            role: Role::User,
            scope: Scope::default(),
        }],
        oidc: None,
        limits,
    }
}

fn generous() -> Limits {
    Limits {
        writes_per_second: 10_000,
        write_burst: 10_000,
        max_streams_per_principal: 1_000,
        max_lease_capacity: 64,
    }
}

async fn daemon(db: &TestDb, auth: AuthSettings) -> Daemon {
    Daemon::start_with(db, move |config: &mut Config| config.auth = Some(auth)).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    GrpcWeb,
    Connect,
}

/// One call's outcome: the status code, or `Ok` for a stream that opened
/// and stayed open.
async fn call(
    protocol: Protocol,
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
    message: &[u8],
    stream: bool,
) -> Code {
    tokio::time::timeout(
        TIMEOUT,
        call_inner(protocol, addr, path, bearer, message, stream),
    )
    .await
    .expect("the call answers in time")
}

fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn connect_code(name: &str) -> Code {
    match name {
        "canceled" => Code::Cancelled,
        "unknown" => Code::Unknown,
        "invalid_argument" => Code::InvalidArgument,
        "deadline_exceeded" => Code::DeadlineExceeded,
        "not_found" => Code::NotFound,
        "already_exists" => Code::AlreadyExists,
        "permission_denied" => Code::PermissionDenied,
        "resource_exhausted" => Code::ResourceExhausted,
        "failed_precondition" => Code::FailedPrecondition,
        "aborted" => Code::Aborted,
        "out_of_range" => Code::OutOfRange,
        "unimplemented" => Code::Unimplemented,
        "internal" => Code::Internal,
        "unavailable" => Code::Unavailable,
        "data_loss" => Code::DataLoss,
        "unauthenticated" => Code::Unauthenticated,
        other => panic!("unknown Connect code {other:?}"),
    }
}

fn grpc_status(value: &[u8]) -> Code {
    Code::from_i32(std::str::from_utf8(value).unwrap().trim().parse().unwrap())
}

/// How long an open stream is watched for an error before it counts as
/// opened.
const STREAM_GRACE: Duration = Duration::from_millis(300);

async fn call_inner(
    protocol: Protocol,
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
    message: &[u8],
    stream: bool,
) -> Code {
    let mut builder = HttpClient::builder(TokioExecutor::new());
    if protocol == Protocol::Grpc {
        builder.http2_only(true);
    }
    let client = builder.build_http::<Full<Bytes>>();
    let (content_type, body) = match protocol {
        Protocol::Grpc => ("application/grpc", frame(0, message)),
        Protocol::GrpcWeb => ("application/grpc-web+proto", frame(0, message)),
        Protocol::Connect if stream => ("application/connect+proto", frame(0, message)),
        Protocol::Connect => ("application/proto", message.to_vec()),
    };
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("the daemon answers");
    let status = response.status();
    if let Some(code) = response.headers().get("grpc-status") {
        return grpc_status(code.as_bytes());
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    match protocol {
        Protocol::Connect if !stream => {
            let bytes = body.collect().await.unwrap().to_bytes();
            if status == http::StatusCode::OK {
                return Code::Ok;
            }
            let error: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            connect_code(error["code"].as_str().unwrap())
        }
        _ => loop {
            let next = if stream {
                match tokio::time::timeout(STREAM_GRACE, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => return Code::Ok,
                }
            } else {
                body.frame().await
            };
            let Some(frame) = next else {
                // gRPC ends with trailers; gRPC-Web and Connect with a
                // final message parsed below.
                break ended(protocol, &data).unwrap_or(Code::Ok);
            };
            let frame = frame.expect("a readable body");
            if let Some(trailers) = frame.trailers_ref() {
                return grpc_status(trailers.get("grpc-status").unwrap().as_bytes());
            }
            if let Ok(chunk) = frame.into_data() {
                data.extend_from_slice(&chunk);
                if let Some(code) = ended(protocol, &data) {
                    return code;
                }
                if stream && protocol != Protocol::Grpc && first_message(&data) {
                    return Code::Ok;
                }
            }
        },
    }
}

/// Whether `data` holds a whole ordinary message frame (flags 0).
fn first_message(data: &[u8]) -> bool {
    data.len() >= 5
        && data[0] == 0
        && data.len() >= 5 + u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize
}

/// The status of a gRPC-Web trailer frame or Connect end-of-stream message
/// in `data`, once it has arrived whole.
fn ended(protocol: Protocol, mut data: &[u8]) -> Option<Code> {
    while data.len() >= 5 {
        let flags = data[0];
        let length = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data.len() < 5 + length {
            return None;
        }
        let payload = &data[5..5 + length];
        match protocol {
            Protocol::GrpcWeb if flags & 0x80 != 0 => {
                let text = std::str::from_utf8(payload).unwrap();
                let line = text
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix("grpc-status:"))
                    .unwrap();
                return Some(grpc_status(line.as_bytes()));
            }
            Protocol::Connect if flags & 0x02 != 0 => {
                let end: serde_json::Value = serde_json::from_slice(payload).unwrap();
                return Some(match end["error"]["code"].as_str() {
                    Some(code) => connect_code(code),
                    None => Code::Ok,
                });
            }
            _ => {}
        }
        data = &data[5 + length..];
    }
    None
}

/// A root task of `run` on the queue `default`.
fn queued(
    run: &str,
    name: &str,
    parent: Option<&str>,
) -> actionsd::proto::flyteidl2::actions::EnqueueRequest {
    use actionsd::proto::flyteidl2::actions::action::Spec;
    let mut request = common::task(run, name, parent);
    if let Some(Spec::Task(task)) = request.action.as_mut().and_then(|a| a.spec.as_mut()) {
        task.queue = "default".into();
    }
    request
}

/// A request message from its proto3 JSON, under the method's schema.
fn json(path: &str, text: &str) -> Vec<u8> {
    let (request, _) = actionsd::schema::method_messages(path).unwrap();
    actionsd::schema::json_to_binary(&request, text.as_bytes()).unwrap()
}

const ACTION: &str =
    r#"{"run":{"project":"flytesnacks","domain":"development","name":"r1"},"name":"a0"}"#;
const RUN_ID: &str = r#"{"project":"flytesnacks","domain":"development","name":"r1"}"#;

/// Every RPC, with a request naming run r1 (project flytesnacks,
/// domain development), and whether it is a server stream.
fn requests() -> Vec<(&'static str, Vec<u8>, bool)> {
    let a = "/flyteidl2.actions.ActionsService/";
    let e = "/actionsd.executor.v1.ExecutorService/";
    let r = "/actionsd.read.v1.ReadService/";
    let w = "/flyteidl2.workflow.RunService/";
    let d = "/flyteidl2.dataproxy.DataProxyService/";
    let p = |service: &'static str, method: &'static str| -> &'static str {
        format!("{service}{method}").leak()
    };
    let action = format!(r#"{{"actionId":{ACTION}}}"#);
    vec![
        (
            p(a, "Enqueue"),
            queued(RUN, "a0", None).encode_to_vec(),
            false,
        ),
        (
            p(a, "Update"),
            common::status_update(RUN, "a0", 1, common::RUNNING).encode_to_vec(),
            false,
        ),
        (
            p(a, "Signal"),
            common::signal(
                RUN,
                "c1",
                "a0",
                actionsd::proto::flyteidl2::core::primitive::Value::Boolean(true),
            )
            .encode_to_vec(),
            false,
        ),
        (
            p(a, "WatchForUpdates"),
            common::watch_request(RUN, "a0").encode_to_vec(),
            true,
        ),
        (
            p(e, "Lease"),
            json(
                p(e, "Lease"),
                r#"{"executorId":"m1","queue":"default","capacity":1}"#,
            ),
            true,
        ),
        (
            p(e, "Heartbeat"),
            json(p(e, "Heartbeat"), r#"{"executorId":"m1"}"#),
            false,
        ),
        (
            p(e, "Finish"),
            json(
                p(e, "Finish"),
                &format!(
                    r#"{{"executorId":"m1","actionId":{ACTION},"attempt":1,"phase":"ACTION_PHASE_SUCCEEDED"}}"#
                ),
            ),
            false,
        ),
        (
            p(e, "AppendLogs"),
            json(
                p(e, "AppendLogs"),
                &format!(r#"{{"executorId":"m1","actionId":{ACTION},"attempt":1}}"#),
            ),
            false,
        ),
        (
            p(r, "GetAction"),
            json(p(r, "GetAction"), &format!(r#"{{"id":{ACTION}}}"#)),
            false,
        ),
        (
            p(r, "ListActions"),
            json(p(r, "ListActions"), &format!(r#"{{"run":{RUN_ID}}}"#)),
            false,
        ),
        (
            p(r, "ListRuns"),
            json(p(r, "ListRuns"), r#"{"project":"flytesnacks"}"#),
            false,
        ),
        (
            p(r, "GetHistory"),
            json(p(r, "GetHistory"), &format!(r#"{{"id":{ACTION}}}"#)),
            false,
        ),
        (
            p(r, "WatchRun"),
            json(p(r, "WatchRun"), &format!(r#"{{"run":{RUN_ID}}}"#)),
            true,
        ),
        (
            p(w, "GetRunDetails"),
            json(p(w, "GetRunDetails"), &format!(r#"{{"runId":{RUN_ID}}}"#)),
            false,
        ),
        (
            p(w, "GetActionDetails"),
            json(p(w, "GetActionDetails"), &action),
            false,
        ),
        (
            p(w, "WatchActionDetails"),
            json(p(w, "WatchActionDetails"), &action),
            true,
        ),
        (
            p(w, "ListRuns"),
            json(
                p(w, "ListRuns"),
                r#"{"projectId":{"name":"flytesnacks","domain":"development"}}"#,
            ),
            false,
        ),
        (
            p(w, "CreateRun"),
            json(
                p(w, "CreateRun"),
                r#"{"projectId":{"name":"flytesnacks","domain":"development"}}"#,
            ),
            false,
        ),
        (
            p(d, "CreateUploadLocation"),
            json(
                p(d, "CreateUploadLocation"),
                r#"{"project":"flytesnacks","domain":"development","filename":"f","contentMd5":"AAAAAAAAAAAAAAAAAAAAAA=="}"#,
            ),
            false,
        ),
        (
            p(d, "UploadInputs"),
            json(p(d, "UploadInputs"), &format!(r#"{{"runId":{RUN_ID}}}"#)),
            false,
        ),
        (
            p(d, "CreateDownloadLink"),
            json(
                p(d, "CreateDownloadLink"),
                &format!(
                    r#"{{"artifactType":"ARTIFACT_TYPE_REPORT","actionAttemptId":{{"actionId":{ACTION},"attempt":1}}}}"#
                ),
            ),
            false,
        ),
        (
            p(d, "GetActionData"),
            json(p(d, "GetActionData"), &action),
            false,
        ),
        (p(d, "TailLogs"), json(p(d, "TailLogs"), &action), true),
        (
            "/flyteidl2.cluster.ClusterService/SelectCluster",
            Vec::new(),
            false,
        ),
        (
            "/flyteidl2.auth.AuthMetadataService/GetOAuth2Metadata",
            Vec::new(),
            false,
        ),
        (
            "/flyteidl2.auth.AuthMetadataService/GetPublicClientConfig",
            Vec::new(),
            false,
        ),
        // Abort and the deletions last: they change what the calls above
        // find (which decides their non-auth outcome only).
        (
            p(a, "Abort"),
            common::abort(RUN, "a0", "matrix").encode_to_vec(),
            false,
        ),
        (
            p(w, "AbortRun"),
            json(p(w, "AbortRun"), &format!(r#"{{"runId":{RUN_ID}}}"#)),
            false,
        ),
        (
            p(r, "DeleteRun"),
            json(p(r, "DeleteRun"), &format!(r#"{{"runId":{RUN_ID}}}"#)),
            false,
        ),
    ]
}

/// The roles the matrix expects to pass, written out independently of the
/// daemon's table: R reader, U user, E executor, A admin, * anyone (no
/// credential needed).
fn expected(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap();
    let service = path.split('/').nth(1).unwrap();
    match (service, method) {
        ("flyteidl2.actions.ActionsService", "Enqueue" | "Abort" | "Signal") => "UA",
        ("flyteidl2.actions.ActionsService", "WatchForUpdates") => "RUA",
        ("flyteidl2.actions.ActionsService", "Update") => "EA",
        ("actionsd.executor.v1.ExecutorService", _) => "EA",
        ("actionsd.read.v1.ReadService", "DeleteRun") => "A",
        ("actionsd.read.v1.ReadService", _) => "RUA",
        ("flyteidl2.workflow.RunService", "CreateRun" | "AbortRun") => "UA",
        ("flyteidl2.workflow.RunService", _) => "RUA",
        ("flyteidl2.dataproxy.DataProxyService", "CreateUploadLocation" | "UploadInputs") => "UA",
        ("flyteidl2.dataproxy.DataProxyService", _) => "RUA",
        ("flyteidl2.cluster.ClusterService", _) => "*",
        ("flyteidl2.auth.AuthMetadataService", _) => "*",
        other => panic!("no expectation for {other:?}"),
    }
}

fn denied(code: Code) -> bool {
    matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

/// Every RPC × {no credential, a bad one, reader, user, executor, admin}
/// on one protocol: each either passes authorization (any code but
/// UNAUTHENTICATED / PERMISSION_DENIED) or is refused with the right one.
async fn role_matrix(protocol: Protocol) {
    let db = TestDb::sqlite();
    let daemon = daemon(&db, settings(generous())).await;
    // The run every request names.
    let mut admin = daemon.client().await;
    let mut setup = tonic::Request::new(queued(RUN, "a0", None));
    setup
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    admin.enqueue(setup).await.expect("the admin enqueues");

    let roles = [('R', READER), ('U', USER), ('E', EXECUTOR), ('A', ADMIN)];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (path, message, stream) in requests() {
        let expect = expected(path);
        for (bearer, label) in [(None, "none"), (Some("not-a-token"), "bad")] {
            let code = call(protocol, daemon.addr, path, bearer, &message, stream).await;
            checked += 1;
            let ok = if expect == "*" {
                !denied(code)
            } else {
                code == Code::Unauthenticated
            };
            if !ok {
                failures.push(format!("{path} with {label} credential: {code:?}"));
            }
        }
        for (role, bearer) in roles {
            let code = call(protocol, daemon.addr, path, Some(bearer), &message, stream).await;
            checked += 1;
            let allowed = expect == "*" || expect.contains(role);
            let ok = if allowed {
                !denied(code)
            } else {
                code == Code::PermissionDenied
            };
            if !ok {
                failures.push(format!(
                    "{path} as {role}: {code:?} (expected {})",
                    if allowed {
                        "allowed"
                    } else {
                        "PERMISSION_DENIED"
                    }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{protocol:?}: {failures:#?}");
    assert_eq!(checked, requests().len() * 6);
    daemon.stop().await;
}

#[tokio::test]
async fn role_matrix_on_grpc() {
    role_matrix(Protocol::Grpc).await;
}

#[tokio::test]
async fn role_matrix_on_grpc_web() {
    role_matrix(Protocol::GrpcWeb).await;
}

#[tokio::test]
async fn role_matrix_on_connect() {
    role_matrix(Protocol::Connect).await;
}

/// Scopes: a user confined to another project, and an executor confined to
/// another queue, are refused on r1 on every protocol.
#[tokio::test]
async fn scopes_are_enforced_on_every_protocol() {
    let db = TestDb::sqlite();
    let daemon = daemon(&db, settings(generous())).await;
    let mut admin = daemon.client().await;
    let mut setup = tonic::Request::new(queued(RUN, "a0", None));
    setup
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    admin.enqueue(setup).await.unwrap();
    let all = requests();
    let find = |name: &str| {
        all.iter()
            .find(|(p, _, _)| p.ends_with(name))
            .cloned()
            .unwrap()
    };
    for protocol in [Protocol::Grpc, Protocol::GrpcWeb, Protocol::Connect] {
        for name in [
            "ActionsService/Enqueue",
            "ActionsService/Abort",
            "ActionsService/WatchForUpdates",
            "ReadService/GetAction",
            "ReadService/WatchRun",
            "RunService/GetRunDetails",
            "RunService/ListRuns",
            "DataProxyService/CreateUploadLocation",
        ] {
            let (path, message, stream) = find(name);
            let code = call(
                protocol,
                daemon.addr,
                path,
                Some(OTHER_USER),
                &message,
                stream,
            )
            .await;
            assert_eq!(code, Code::PermissionDenied, "{protocol:?} {path}");
        }
        // An unfiltered listing is refused to a scoped principal.
        let path = "/actionsd.read.v1.ReadService/ListRuns";
        let code = call(
            protocol,
            daemon.addr,
            path,
            Some(OTHER_USER),
            &json(path, "{}"),
            false,
        )
        .await;
        assert_eq!(
            code,
            Code::PermissionDenied,
            "{protocol:?} unfiltered ListRuns"
        );
        for name in [
            "ExecutorService/Lease",
            "ExecutorService/Finish",
            "ActionsService/Update",
        ] {
            let (path, message, stream) = find(name);
            let code = call(
                protocol,
                daemon.addr,
                path,
                Some(Q1_EXECUTOR),
                &message,
                stream,
            )
            .await;
            assert_eq!(code, Code::PermissionDenied, "{protocol:?} {path}");
        }
        // Its own queue it may lease.
        let lease = "/actionsd.executor.v1.ExecutorService/Lease";
        let message = json(lease, r#"{"executorId":"q1m","queue":"q1","capacity":1}"#);
        let code = call(
            protocol,
            daemon.addr,
            lease,
            Some(Q1_EXECUTOR),
            &message,
            true,
        )
        .await;
        assert_eq!(code, Code::Ok, "{protocol:?} lease of q1");
    }
    daemon.stop().await;
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    typ: &'a str,
    role: &'a str,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(key: &str, exp: u64, role: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            iss: "actionsd-test",
            sub: "someone",
            aud: "actionsd",
            exp,
            iat: now().saturating_sub(3600),
            typ: "access",
            role,
        },
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

/// POSTs a form to the token endpoint; the status and JSON body.
async fn token_request(
    addr: std::net::SocketAddr,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut request = client
        .post(format!("http://{addr}/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some((id, secret)) = basic {
        use base64::Engine as _;
        // As the Flyte SDK sends it: the secret form-quoted (quote_plus).
        let secret: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        request = request.header("authorization", format!("Basic {encoded}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn expired_and_forged_tokens_are_refused_and_issued_ones_work() {
    let db = TestDb::sqlite();
    let daemon = daemon(&db, settings(generous())).await;
    let mut client = daemon.client().await;
    let watch = || common::watch_request(RUN, "a0");
    client
        .enqueue(bearer(queued(RUN, "a0", None), USER))
        .await
        .unwrap();

    // Signed with the daemon's key but expired a minute ago.
    let expired = jwt(SIGNING_KEY, now() - 60, "admin");
    let message = common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &expired))
            .await,
        Code::Unauthenticated,
    );
    assert!(message.contains("invalid or expired"), "{message}");
    // Valid claims, another key.
    let forged = jwt(
        "another-key-of-at-least-32-bytes-long!!",
        now() + 600,
        "admin",
    );
    common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &forged))
            .await,
        Code::Unauthenticated,
    );
    // Tampered: the admin token's payload with another signature.
    let good = jwt(SIGNING_KEY, now() + 600, "reader");
    let mut parts: Vec<&str> = good.split('.').collect();
    let admin_payload = jwt(SIGNING_KEY, now() + 600, "admin");
    let admin_payload = admin_payload.split('.').nth(1).unwrap().to_owned();
    parts[1] = &admin_payload;
    let tampered = parts.join(".");
    common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &tampered))
            .await,
        Code::Unauthenticated,
    );
    // A well-signed reader token reads but may not write.
    client
        .watch_for_updates(bearer(watch(), &good))
        .await
        .expect("a reader watches");
    common::expect_code(
        client.enqueue(bearer(queued(RUN, "a0", None), &good)).await,
        Code::PermissionDenied,
    );

    // The token endpoint: HTTP Basic as the SDK sends it, or the form.
    let grant = [("grant_type", "client_credentials")];
    let (status, body) = token_request(daemon.addr, Some((CLIENT_ID, CLIENT_SECRET)), &grant).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 600);
    let access = body["access_token"].as_str().unwrap().to_owned();
    client
        .enqueue(bearer(queued(RUN, "a0", None), &access))
        .await
        .expect("the client's token (role user) enqueues");
    let (status, _) = token_request(
        daemon.addr,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = token_request(daemon.addr, Some((CLIENT_ID, "wrong")), &grant).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, _) = token_request(daemon.addr, Some(("nobody", CLIENT_SECRET)), &grant).await;
    assert_eq!(status, 401);
    let (status, body) = token_request(
        daemon.addr,
        Some((CLIENT_ID, CLIENT_SECRET)),
        &[("grant_type", "password")],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    // AuthMetadataService points at the token endpoint.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut metadata =
        actionsd::proto::flyteidl2::auth::auth_metadata_service_client::AuthMetadataServiceClient::new(channel);
    let oauth = metadata
        .get_o_auth2_metadata(actionsd::proto::flyteidl2::auth::GetOAuth2MetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        oauth.token_endpoint,
        format!("http://{}/oauth2/token", daemon.addr)
    );
    assert_eq!(oauth.grant_types_supported, ["client_credentials"]);
    let public = metadata
        .get_public_client_config(actionsd::proto::flyteidl2::auth::GetPublicClientConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(public.authorization_metadata_key, "authorization");
    daemon.stop().await;
}

/// An executor's lease carries a credential for the task; with it the task
/// may enqueue, watch and abort in its own run, and nothing else, and only
/// while its attempt lives.
async fn a_task_credential_is_confined_to_its_run_and_attempt(db: TestDb) {
    use actionsd::proto::actionsd::executor::v1::{lease_response, FinishRequest, LeaseRequest};
    let daemon = daemon(&db, settings(generous())).await;
    let mut client = daemon.client().await;
    client
        .enqueue(bearer(queued(RUN, "a0", None), USER))
        .await
        .unwrap();
    client
        .enqueue(bearer(queued("r2", "a0", None), USER))
        .await
        .unwrap();
    let mut executor = daemon.executor_client().await;
    let mut leases = executor
        .lease(bearer(
            LeaseRequest {
                executor_id: "m1".into(),
                queue: "default".into(),
                capacity: 1,
                max_leases: 0,
            },
            EXECUTOR,
        ))
        .await
        .unwrap()
        .into_inner();
    let leased = match tokio::time::timeout(TIMEOUT, leases.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .event
    {
        Some(lease_response::Event::Leased(leased)) => leased,
        other => panic!("expected a lease, got {other:?}"),
    };
    let run = leased
        .action_id
        .as_ref()
        .unwrap()
        .run
        .as_ref()
        .unwrap()
        .name
        .clone();
    let other = if run == RUN { "r2" } else { RUN };
    let credential = leased.task_credential.expect("a task credential");
    assert_eq!(credential.client_id, "actionsd-task");
    let task = credential.client_secret.clone();

    // Inside its run: enqueue a child, watch, abort the child.
    client
        .enqueue(bearer(queued(&run, "child", Some("a0")), &task))
        .await
        .expect("the task enqueues in its run");
    client
        .watch_for_updates(bearer(common::watch_request(&run, "a0"), &task))
        .await
        .expect("the task watches its run");
    client
        .abort(bearer(common::abort(&run, "child", "done"), &task))
        .await
        .expect("the task aborts in its run");
    // Outside it: refused.
    common::expect_code(
        client
            .enqueue(bearer(queued(other, "child", Some("a0")), &task))
            .await,
        Code::PermissionDenied,
    );
    common::expect_code(
        client
            .watch_for_updates(bearer(common::watch_request(other, "a0"), &task))
            .await,
        Code::PermissionDenied,
    );
    common::expect_code(
        client
            .abort(bearer(common::abort(other, "a0", "no"), &task))
            .await,
        Code::PermissionDenied,
    );
    // And nothing else, even in its run.
    for protocol in [Protocol::Grpc, Protocol::GrpcWeb, Protocol::Connect] {
        for (path, message, stream) in requests() {
            let method = path.rsplit('/').next().unwrap();
            if matches!(
                method,
                "Enqueue" | "Abort" | "WatchForUpdates" | "SelectCluster"
            ) || path.contains("AuthMetadataService")
            {
                continue;
            }
            let code = call(protocol, daemon.addr, path, Some(&task), &message, stream).await;
            assert_eq!(code, Code::PermissionDenied, "{protocol:?} {path}");
        }
    }
    // The token endpoint exchanges it (the API-key path of the SDK).
    let grant = [("grant_type", "client_credentials")];
    let (status, body) = token_request(daemon.addr, Some(("actionsd-task", &task)), &grant).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap().to_owned();
    client
        .watch_for_updates(bearer(common::watch_request(&run, "a0"), &access))
        .await
        .expect("the exchanged token watches its run");

    // An executor's ids are its own: the lease is held as
    // `<principal>/<executor id>`, and another executor principal naming
    // the same id can neither finish it nor write its log.
    let finish = |token: &'static str| {
        bearer(
            FinishRequest {
                executor_id: "m1".into(),
                action_id: leased.action_id.clone(),
                attempt: leased.attempt,
                phase: common::SUCCEEDED,
                output_uri: String::new(),
                error: None,
                retry: false,
            },
            token,
        )
    };
    let mut read = actionsd::proto::actionsd::read::v1::read_service_client::ReadServiceClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let holder = read
        .get_action(bearer(
            actionsd::proto::actionsd::read::v1::GetActionRequest {
                id: leased.action_id.clone(),
            },
            READER,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap()
        .lease_holder;
    assert_eq!(holder, "executor/m1");
    common::expect_code(
        executor.finish(finish(EXECUTOR_2)).await,
        Code::FailedPrecondition,
    );

    // Once the attempt finishes, the credential is dead.
    executor.finish(finish(EXECUTOR)).await.unwrap();
    common::expect_code(
        client
            .watch_for_updates(bearer(common::watch_request(&run, "a0"), &task))
            .await,
        Code::Unauthenticated,
    );
    let (status, _) = token_request(daemon.addr, Some(("actionsd-task", &task)), &grant).await;
    assert_eq!(status, 401);
    drop(leases);
    daemon.stop().await;
}

conformance!(a_task_credential_is_confined_to_its_run_and_attempt);

/// Abort and Signal record the authenticated principal, whatever the
/// client claimed, and GetAction shows it; every change's history event
/// names who asked for it.
async fn aborts_and_signals_record_the_authenticated_principal(db: TestDb) {
    use actionsd::proto::flyteidl2::common as pb;
    let daemon = daemon(&db, settings(generous())).await;
    let mut client = daemon.client().await;
    client
        .enqueue(bearer(queued(RUN, "a0", None), USER))
        .await
        .unwrap();
    // A condition signalled by the admin, claiming to be someone else.
    client
        .enqueue(bearer(
            common::condition(
                RUN,
                "c1",
                "a0",
                actionsd::proto::flyteidl2::core::SimpleType::Boolean,
            ),
            USER,
        ))
        .await
        .unwrap();
    let mut signal = common::signal(
        RUN,
        "c1",
        "a0",
        actionsd::proto::flyteidl2::core::primitive::Value::Boolean(true),
    );
    signal.signalled_by = Some(pb::EnrichedIdentity {
        principal: Some(pb::enriched_identity::Principal::User(pb::User {
            id: Some(pb::UserIdentifier {
                subject: "someone-else".into(),
            }),
            ..Default::default()
        })),
    });
    client.signal(bearer(signal, ADMIN)).await.unwrap();
    let mut abort = common::abort(RUN, "a0", "stop");
    abort.aborted_by = Some(pb::EnrichedIdentity {
        principal: Some(pb::enriched_identity::Principal::User(pb::User {
            id: Some(pb::UserIdentifier {
                subject: "someone-else".into(),
            }),
            ..Default::default()
        })),
    });
    client.abort(bearer(abort, USER)).await.unwrap();
    // GetAction shows who aborted.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut read =
        actionsd::proto::actionsd::read::v1::read_service_client::ReadServiceClient::new(channel);
    let action = read
        .get_action(bearer(
            actionsd::proto::actionsd::read::v1::GetActionRequest {
                id: Some(common::aid(RUN, "a0")),
            },
            READER,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(action.phase, common::ABORTED);
    match action.aborted_by.and_then(|who| who.principal) {
        Some(pb::enriched_identity::Principal::User(user)) => {
            assert_eq!(user.id.unwrap().subject, "user");
        }
        other => panic!("unexpected identity {other:?}"),
    }
    let condition = read
        .get_action(bearer(
            actionsd::proto::actionsd::read::v1::GetActionRequest {
                id: Some(common::aid(RUN, "c1")),
            },
            READER,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    match condition.signalled_by.and_then(|who| who.principal) {
        Some(pb::enriched_identity::Principal::User(user)) => {
            assert_eq!(user.id.unwrap().subject, "admin");
        }
        other => panic!("unexpected identity {other:?}"),
    }
    // History: who asked for each change.
    for (name, expected) in [
        (
            "a0",
            vec![("user", common::QUEUED), ("user", common::ABORTED)],
        ),
        (
            "c1",
            vec![("user", common::PAUSED), ("admin", common::SUCCEEDED)],
        ),
    ] {
        let events = read
            .get_history(bearer(
                actionsd::proto::actionsd::read::v1::GetHistoryRequest {
                    id: Some(common::aid(RUN, name)),
                },
                READER,
            ))
            .await
            .unwrap()
            .into_inner()
            .events;
        let seen: Vec<(&str, i32)> = events
            .iter()
            .map(|e| (e.changed_by.as_str(), e.phase))
            .collect();
        assert_eq!(seen, expected, "history of {name}");
    }
    daemon.stop().await;
}

conformance!(aborts_and_signals_record_the_authenticated_principal);

#[tokio::test]
async fn write_rate_streams_and_lease_capacity_are_limited() {
    use actionsd::proto::actionsd::executor::v1::LeaseRequest;
    let db = TestDb::sqlite();
    let daemon = daemon(
        &db,
        settings(Limits {
            writes_per_second: 1,
            write_burst: 3,
            max_streams_per_principal: 2,
            max_lease_capacity: 8,
        }),
    )
    .await;
    let mut client = daemon.client().await;
    // Writes: the burst passes, then RESOURCE_EXHAUSTED (bounded loop).
    let mut refused = None;
    for i in 0..10 {
        let result = client
            .enqueue(bearer(queued(&format!("rate{i}"), "a0", None), USER))
            .await;
        if let Err(status) = result {
            refused = Some((i, status.code()));
            break;
        }
    }
    let (at, code) = refused.expect("the write rate is limited");
    assert_eq!(code, Code::ResourceExhausted);
    assert!((3..=4).contains(&at), "refused at write {at}");
    // Other principals are not affected.
    client
        .enqueue(bearer(queued("rate-admin", "a0", None), ADMIN))
        .await
        .expect("another principal writes");

    // Streams: two open, the third refused, on each protocol's wire.
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(
            client
                .watch_for_updates(bearer(common::watch_request("rate0", "a0"), READER))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    common::expect_code(
        client
            .watch_for_updates(bearer(common::watch_request("rate0", "a0"), READER))
            .await,
        Code::ResourceExhausted,
    );
    let watch = common::watch_request("rate0", "a0").encode_to_vec();
    let path = "/flyteidl2.actions.ActionsService/WatchForUpdates";
    for protocol in [Protocol::GrpcWeb, Protocol::Connect] {
        let code = call(protocol, daemon.addr, path, Some(READER), &watch, true).await;
        assert_eq!(code, Code::ResourceExhausted, "{protocol:?}");
    }
    // Closing one frees its slot.
    drop(open.pop());
    let reopened = tokio::time::timeout(TIMEOUT, async {
        loop {
            match client
                .watch_for_updates(bearer(common::watch_request("rate0", "a0"), READER))
                .await
            {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("a closed stream frees its slot");
    drop(reopened);

    // Lease capacity.
    let mut executor = daemon.executor_client().await;
    let lease = |capacity| LeaseRequest {
        executor_id: "big".into(),
        queue: "default".into(),
        capacity,
        max_leases: 0,
    };
    let message = common::expect_code(
        executor.lease(bearer(lease(4_294_967_295), EXECUTOR)).await,
        Code::ResourceExhausted,
    );
    assert!(message.contains("max_lease_capacity"), "{message}");
    executor
        .lease(bearer(lease(8), EXECUTOR))
        .await
        .expect("a lease within the limit");
    daemon.stop().await;
}

/// Tokens of an external OIDC issuer, checked against a JWKS this test
/// serves on loopback; a key added later is picked up on its first use.
#[tokio::test]
async fn oidc_tokens_are_checked_against_the_issuers_jwks() {
    use p256::pkcs8::EncodePrivateKey;
    let keys: Vec<p256::SecretKey> = (0..2)
        .map(|_| p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng))
        .collect();
    let jwk = |key: &p256::SecretKey, kid: &str| {
        let mut value: serde_json::Value =
            serde_json::from_str(&key.public_key().to_jwk_string()).unwrap();
        value["kid"] = kid.into();
        value["alg"] = "ES256".into();
        value["use"] = "sig".into();
        value
    };
    // The JWKS server: first one key, then both.
    let published = Arc::new(std::sync::Mutex::new(vec![jwk(&keys[0], "k0")]));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    let server = {
        let (published, fetches) = (published.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (published, fetches) = (published.clone(), fetches.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = serde_json::json!({ "keys": *published.lock().unwrap() });
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body.to_string()),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    };
    let mut auth = settings(generous());
    auth.oidc = Some(actionsd::auth::config::OidcSettings {
        issuer: "https://idp.example".into(),
        jwks_url: format!("http://{jwks_addr}/jwks"),
        audience: "actionsd".into(),
        role_claim: Some("actionsd_role".into()),
        default_role: None,
        fetch_timeout: Duration::from_secs(5),
        scope: Scope::default(),
    });
    let db = TestDb::sqlite();
    let daemon = daemon(&db, auth).await;
    let sign = |key: &p256::SecretKey, kid: &str, role: &str, iss: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let pem = key.to_pkcs8_pem(Default::default()).unwrap();
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({
                "iss": iss, "sub": "alice", "aud": "actionsd",
                "exp": now() + 600, "iat": now(), "actionsd_role": role,
            }),
            &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let mut client = daemon.client().await;
    let user = sign(&keys[0], "k0", "user", "https://idp.example");
    client
        .enqueue(bearer(queued(RUN, "a0", None), &user))
        .await
        .expect("an OIDC user enqueues");
    let reader = sign(&keys[0], "k0", "reader", "https://idp.example");
    common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &reader))
            .await,
        Code::PermissionDenied,
    );
    // Another issuer, or a key the issuer does not publish: refused.
    let wrong_issuer = sign(&keys[0], "k0", "user", "https://evil.example");
    common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &wrong_issuer))
            .await,
        Code::Unauthenticated,
    );
    let forged = sign(&keys[1], "k0", "user", "https://idp.example");
    common::expect_code(
        client
            .enqueue(bearer(queued(RUN, "a0", None), &forged))
            .await,
        Code::Unauthenticated,
    );
    // A rotated-in key is fetched on first use of its kid.
    published.lock().unwrap().push(jwk(&keys[1], "k1"));
    let fetched = fetches.load(std::sync::atomic::Ordering::SeqCst);
    // Unknown kids refetch at most every 10 s; wait it out (bounded).
    let rotated = sign(&keys[1], "k1", "user", "https://idp.example");
    let accepted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if client
                .enqueue(bearer(queued(RUN, "a0", None), &rotated))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(accepted.is_ok(), "the rotated key is picked up");
    assert!(fetches.load(std::sync::atomic::Ordering::SeqCst) > fetched);
    server.abort();
    daemon.stop().await;
}

/// The daemon's own output (the real binary, its logs on stdout and
/// stderr) never contains a token, a client secret or a signing key, while
/// it audits every write with the principal.
#[tokio::test]
async fn secrets_never_appear_in_the_daemons_output() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let home = tempfile::tempdir().unwrap();
    let hash = actionsd::auth::hash_secret(CLIENT_SECRET, false).unwrap();
    let config = home.path().join("actionsd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
signing_key = "{SIGNING_KEY}"
[[auth.tokens]]
name = "user"
sha256 = "{}"
role = "user"
[[auth.clients]]
client_id = "{CLIENT_ID}"
secret_hash = "{hash}"
role = "user"
"#,
            actionsd::auth::hash_secret(USER, true).unwrap()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_actionsd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--database-url")
        .arg(format!("sqlite://{}", home.path().join("a.db").display()))
        .env("RUST_LOG", "debug")
        .env("ACTIONSD_BLOB_URL", home.path().join("blobs"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let addr: std::net::SocketAddr = tokio::time::timeout(TIMEOUT, async {
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).await.unwrap() > 0,
                "exited: {seen}"
            );
            seen.push_str(&line);
            if let Some((_, rest)) = line.split_once("address") {
                let addr = rest
                    .trim_start_matches(['=', '"', ':', ' '])
                    .split(|c: char| c == '"' || c.is_whitespace() || c == '\u{1b}')
                    .next()
                    .unwrap()
                    .to_owned();
                if let Ok(addr) = addr.parse() {
                    break addr;
                }
            }
        }
    })
    .await
    .expect("the daemon listens");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient::new(
            channel,
        );
    client
        .enqueue(bearer(queued(RUN, "a0", None), USER))
        .await
        .unwrap();
    let _ = client
        .enqueue(bearer(queued(RUN, "a0", None), "wrong-token-value"))
        .await;
    let grant = [("grant_type", "client_credentials")];
    let (status, body) = token_request(addr, Some((CLIENT_ID, CLIENT_SECRET)), &grant).await;
    assert_eq!(status, 200);
    let access = body["access_token"].as_str().unwrap().to_owned();
    client
        .abort(bearer(common::abort(RUN, "a0", "stop"), &access))
        .await
        .unwrap();
    let _ = token_request(addr, Some((CLIENT_ID, "a-wrong-secret-value")), &grant).await;
    // SIGTERM, then read everything.
    let pid = libc::pid_t::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill only sends a signal, to our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let mut rest = String::new();
    let mut stderr = String::new();
    let mut err = child.stderr.take().unwrap();
    tokio::time::timeout(TIMEOUT, async {
        stdout.read_to_string(&mut rest).await.unwrap();
        err.read_to_string(&mut stderr).await.unwrap();
        child.wait().await.unwrap();
    })
    .await
    .expect("the daemon stops");
    let output = format!("{seen}{rest}{stderr}");
    for secret in [
        USER,
        "wrong-token-value",
        CLIENT_SECRET,
        "a-wrong-secret-value",
        SIGNING_KEY,
        access.as_str(),
        &hash,
    ] {
        assert!(
            !output.contains(secret),
            "the output holds a secret:\n{output}"
        );
    }
    // The audit trail names who wrote, what and how it ended.
    let audit: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("actionsd::audit"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("Enqueue") && l.contains("principal=user") && l.contains("OK")),
        "{output}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("Abort") && l.contains("principal=ci")),
        "{output}"
    );
    assert!(
        audit.iter().any(|l| l.contains("Unauthenticated")),
        "{output}"
    );
}

/// The HTTP routes of the table: `/metrics` needs a reader, the signed
/// blob URLs are authorized by their signature alone, the token endpoint
/// is open, and any other path needs a credential.
#[tokio::test]
async fn http_routes_follow_the_table() {
    let db = TestDb::sqlite();
    let daemon = daemon(&db, settings(generous())).await;
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let get = |path: &str, bearer: Option<&str>| {
        let mut request = client.get(format!("http://{}{path}", daemon.addr));
        if let Some(bearer) = bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        request.send()
    };
    assert_eq!(get("/metrics", None).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", Some(EXECUTOR)).await.unwrap().status(), 403);
    let metrics = get("/metrics", Some(READER)).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    // The refusals above are counted.
    assert!(text.contains("actionsd_auth_denied_total"), "{text}");
    // A blob URL without a valid signature is refused by the signature
    // check, not by authentication.
    let blob = get("/blobs/v1/download?k=eA&e=1&s=bad", None)
        .await
        .unwrap();
    assert!(
        blob.status() != 401 && blob.status().is_client_error(),
        "{}",
        blob.status()
    );
    // Unknown paths need a credential.
    assert_eq!(get("/nothing/here", None).await.unwrap().status(), 401);
    // A method spelled another way is not the method: no route normalizes
    // a path past the table.
    let delete = json(
        "/actionsd.read.v1.ReadService/DeleteRun",
        &format!(r#"{{"runId":{RUN_ID}}}"#),
    );
    for path in [
        "/actionsd.read.v1.ReadService/Delete%52un",
        "//actionsd.read.v1.ReadService/DeleteRun",
        "/actionsd.read.v1.ReadService/DeleteRun/",
    ] {
        for protocol in [Protocol::Grpc, Protocol::GrpcWeb, Protocol::Connect] {
            let code = call(protocol, daemon.addr, path, Some(USER), &delete, false).await;
            assert_eq!(code, Code::Unimplemented, "{protocol:?} {path}");
        }
    }
    // The token endpoint answers its own errors.
    let response = client
        .get(format!("http://{}/oauth2/token", daemon.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    daemon.stop().await;
}
