//! The network edge: connection, stream, header, body and request bounds,
//! gRPC framing and codes, gzip, and how quickly the daemon stops.

mod common;

conformance!(
    silent_connections_and_stalled_requests_are_closed,
    a_unary_call_times_out_on_the_server_but_a_stream_does_not,
    connections_over_the_limit_are_refused_with_resource_exhausted,
    http2_streams_per_connection_are_bounded,
    buffered_request_bytes_are_bounded,
    malformed_grpc_and_connect_framing_is_invalid_argument,
    responses_over_the_size_limit_are_resource_exhausted,
    unknown_connect_services_are_unimplemented,
    gzip_is_accepted_and_sent_on_every_grpc_service,
    stopping_with_open_lease_and_watch_streams_is_prompt,
    stopping_while_writes_hang_takes_at_most_shutdown_timeout,
);

use std::io::Write;
use std::time::{Duration, Instant};

use actionsd::proto::actionsd::executor::v1::executor_service_client::ExecutorServiceClient;
use actionsd::proto::actionsd::executor::v1::{lease_response, LeaseRequest};
use actionsd::proto::actionsd::read::v1::read_service_client::ReadServiceClient;
use actionsd::proto::actionsd::read::v1::GetActionRequest;
use actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use actionsd::proto::flyteidl2::actions::{action, EnqueueRequest};
use common::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use tonic::Code;

const ENQUEUE: &str = "flyteidl2.actions.ActionsService/Enqueue";
const WATCH: &str = "flyteidl2.actions.ActionsService/WatchForUpdates";
const GET_ACTION: &str = "actionsd.read.v1.ReadService/GetAction";

/// Reads what the server sends until it closes the connection; fails if
/// it has not closed within `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut received))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the server kept the connection open for {within:?}; received {:?}",
                String::from_utf8_lossy(&received)
            )
        })
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

/// The headers of an HTTP/1.1 Connect unary Enqueue announcing `length`
/// body bytes.
fn connect_headers(daemon: &Daemon, length: usize) -> String {
    format!(
        "POST /{ENQUEUE} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/proto\r\n\
         Content-Length: {length}\r\n\r\n",
        daemon.addr
    )
}

async fn silent_connections_and_stalled_requests_are_closed(db: TestDb) {
    let bound = Duration::from_millis(500);
    let daemon = Daemon::start_with(&db, |c| {
        c.server.header_read_timeout = bound;
        c.server.body_read_timeout = bound;
        c.server.idle_timeout = bound;
    })
    .await;
    // A connection that never sends a byte.
    let started = Instant::now();
    let mut silent = TcpStream::connect(daemon.addr).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= bound, "closed before the idle timeout");

    // Request headers that never finish.
    let mut partial = TcpStream::connect(daemon.addr).await.unwrap();
    partial
        .write_all(format!("POST /{ENQUEUE} HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(&mut partial, Duration::from_secs(5)).await;

    // A body that never completes: DEADLINE_EXCEEDED naming the body,
    // then the connection closes.
    let mut stalled = TcpStream::connect(daemon.addr).await.unwrap();
    stalled
        .write_all(connect_headers(&daemon, 1000).as_bytes())
        .await
        .unwrap();
    stalled.write_all(&[0u8; 10]).await.unwrap();
    let response = read_until_closed(&mut stalled, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    assert!(response.contains("deadline_exceeded"), "{response}");
    assert!(response.contains("request body"), "{response}");

    // The daemon still serves.
    daemon
        .client()
        .await
        .enqueue(task("r1", "a0", None))
        .await
        .unwrap();
    daemon.stop().await;
}

/// Holds the store's write lock (Postgres: an EXCLUSIVE lock on actions;
/// SQLite: an IMMEDIATE transaction) until `release`.
enum WriteLock {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl WriteLock {
    async fn take(db: &TestDb) -> Self {
        match db {
            TestDb::Postgres(pool) => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("LOCK TABLE actions IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Self::Postgres(tx)
            }
            TestDb::Sqlite { pool, .. } => {
                let mut conn = pool.acquire().await.unwrap();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                Self::Sqlite(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            Self::Postgres(tx) => tx.rollback().await.unwrap(),
            Self::Sqlite(mut conn) => {
                sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
            }
        }
    }
}

async fn a_unary_call_times_out_on_the_server_but_a_stream_does_not(db: TestDb) {
    let timeout = Duration::from_secs(1);
    let daemon = Daemon::start_with(&db, |c| c.server.request_timeout = timeout).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;

    let lock = WriteLock::take(&db).await;
    // The client sets no deadline: the server's own bounds the call.
    let started = Instant::now();
    let result = client.enqueue(task("r1", "c1", Some("a0"))).await;
    let elapsed = started.elapsed();
    let message = expect_code(result, Code::DeadlineExceeded);
    assert!(message.contains("did not complete within"), "{message}");
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    // The watch stream outlives the request timeout twice over, and the
    // write (which went on without its caller) reaches it once the lock
    // is gone.
    tokio::time::sleep(timeout).await;
    lock.release().await;
    watcher.until_phase("c1", QUEUED).await;
    daemon.stop().await;
}

async fn connections_over_the_limit_are_refused_with_resource_exhausted(db: TestDb) {
    let daemon = Daemon::start_with(&db, |c| c.server.max_connections = 2).await;
    let mut first = daemon.client().await;
    let mut second = daemon.client().await;
    first.enqueue(task("r1", "a0", None)).await.unwrap();
    second.enqueue(task("r2", "a0", None)).await.unwrap();

    let mut third = daemon.client().await;
    let message = expect_code(
        third.enqueue(task("r3", "a0", None)).await,
        Code::ResourceExhausted,
    );
    assert!(message.contains("limit of 2 connections"), "{message}");

    // Once a connection closes, a new one is served.
    drop(first);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut client = daemon.client().await;
        match client.enqueue(task("r3", "a0", None)).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "no room after a connection closed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    drop(second);
    drop(third);
    daemon.stop().await;
}

async fn http2_streams_per_connection_are_bounded(db: TestDb) {
    let daemon = Daemon::start_with(&db, |c| c.server.max_concurrent_streams = 3).await;
    // One connection for every stream.
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Watcher::open(&mut client, "r1", "a0").await);
    }
    // A fourth stream on the same connection waits for a free slot.
    let mut fourth = client.clone();
    let mut waiting = tokio::spawn(async move {
        fourth
            .watch_for_updates(watch_request("r1", "a0"))
            .await
            .map(|_| ())
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut waiting)
            .await
            .is_err(),
        "a fourth stream opened on a connection limited to three"
    );
    drop(open.pop());
    tokio::time::timeout(TIMEOUT, waiting)
        .await
        .expect("the fourth stream opens once one closes")
        .unwrap()
        .unwrap();
    drop(open);
    daemon.stop().await;
}

async fn buffered_request_bytes_are_bounded(db: TestDb) {
    let daemon = Daemon::start_with(&db, |c| {
        c.server.max_message_size = 65_536;
        c.server.max_buffered_request_bytes = 100_000;
        c.server.body_read_timeout = Duration::from_secs(20);
    })
    .await;
    // Two requests announcing 65,000 bytes each, 60,000 of them sent:
    // the first is held, the second is refused once the total passes the
    // bound.
    let mut first = TcpStream::connect(daemon.addr).await.unwrap();
    first
        .write_all(connect_headers(&daemon, 65_000).as_bytes())
        .await
        .unwrap();
    first.write_all(&[0u8; 60_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = TcpStream::connect(daemon.addr).await.unwrap();
    second
        .write_all(connect_headers(&daemon, 65_000).as_bytes())
        .await
        .unwrap();
    second.write_all(&[0u8; 60_000]).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut response))
        .await
        .expect("the second request is answered at once")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]).into_owned();
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(response.contains("resource_exhausted"), "{response}");
    assert!(response.contains("buffered request bytes"), "{response}");
    drop(first);
    daemon.stop().await;
}

fn h2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(TIMEOUT)
        .build()
        .unwrap()
}

fn grpc_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A raw gRPC call; returns the response headers' grpc-status (set on a
/// trailers-only response, which is how requests refused before their
/// handler are answered).
async fn grpc_status(
    daemon: &Daemon,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> String {
    let mut request = h2()
        .post(format!("http://{}/{path}", daemon.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.body(body).send().await.unwrap();
    // A response with messages has its status in the trailers, which
    // reqwest does not expose: report it as OK once a message arrived.
    match response.headers().get("grpc-status") {
        Some(status) => status.to_str().unwrap().to_owned(),
        None => {
            let body = response.bytes().await.unwrap();
            assert!(body.len() >= 5 && body[0] == 0, "{body:?}");
            "0".to_owned()
        }
    }
}

async fn malformed_grpc_and_connect_framing_is_invalid_argument(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let invalid_argument = (Code::InvalidArgument as i32).to_string();
    let enqueue = task("r1", "a0", None).encode_to_vec();

    // A unary call carrying two messages.
    let mut two = grpc_frame(0, &enqueue);
    two.extend(grpc_frame(0, &enqueue));
    assert_eq!(
        grpc_status(&daemon, ENQUEUE, &[], two).await,
        invalid_argument
    );
    // A malformed grpc-timeout.
    for timeout in ["abc", "10", "123456789S", "5s"] {
        assert_eq!(
            grpc_status(
                &daemon,
                ENQUEUE,
                &[("grpc-timeout", timeout)],
                grpc_frame(0, &enqueue)
            )
            .await,
            invalid_argument,
            "grpc-timeout {timeout}"
        );
    }
    // A message that is not protobuf: the same code as on Connect.
    assert_eq!(
        grpc_status(&daemon, ENQUEUE, &[], grpc_frame(0, &[0xff; 16])).await,
        invalid_argument
    );
    // Flagged compressed with no grpc-encoding.
    assert_eq!(
        grpc_status(&daemon, ENQUEUE, &[], grpc_frame(1, &enqueue)).await,
        invalid_argument
    );
    // None of these enqueued anything; a well-formed call still works.
    assert_eq!(
        grpc_status(
            &daemon,
            ENQUEUE,
            &[("grpc-timeout", "10S")],
            grpc_frame(0, &enqueue)
        )
        .await,
        "0"
    );

    // Connect: a stream envelope flagged compressed, with no
    // connect-content-encoding negotiated.
    let watch = watch_request("r1", "a0").encode_to_vec();
    let response = reqwest::Client::new()
        .post(format!("http://{}/{WATCH}", daemon.addr))
        .header("content-type", "application/connect+proto")
        .body(grpc_frame(1, &watch))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(body[0], 0b10, "only an end-of-stream message");
    let end: serde_json::Value = serde_json::from_slice(&body[5..]).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("compressed"),
        "{end}"
    );
    // Connect unary: an undecodable body.
    let response = reqwest::Client::new()
        .post(format!("http://{}/{ENQUEUE}", daemon.addr))
        .header("content-type", "application/proto")
        .body(vec![0xffu8; 16])
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(error["code"], "invalid_argument");
    daemon.stop().await;
}

/// An Enqueue of a root task carrying `padding` bytes of opaque spec.
fn padded_task(run: &str, padding: usize) -> EnqueueRequest {
    let mut request = task(run, "a0", None);
    if let Some(action::Spec::Task(spec)) = request.action.as_mut().unwrap().spec.as_mut() {
        spec.spec = bytes::Bytes::from(vec![b'x'; padding]);
    }
    request
}

async fn responses_over_the_size_limit_are_resource_exhausted(db: TestDb) {
    let request = padded_task("r1", 4000);
    // The request fits; GetAction's answer (the action and its summary)
    // does not.
    let limit = request.encoded_len() + 8;
    let daemon = Daemon::start_with(&db, |c| c.server.max_message_size = limit).await;
    let mut client = daemon.client().await;
    client.enqueue(request).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let get = GetActionRequest {
        id: Some(aid("r1", "a0")),
    };
    let message = expect_code(
        ReadServiceClient::new(channel)
            .get_action(get.clone())
            .await,
        Code::ResourceExhausted,
    );
    assert!(message.contains("too large"), "{message}");
    // Connect says the same.
    let response = reqwest::Client::new()
        .post(format!("http://{}/{GET_ACTION}", daemon.addr))
        .header("content-type", "application/proto")
        .body(get.encode_to_vec())
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let error: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(error["code"], "resource_exhausted", "{error}");
    daemon.stop().await;
}

async fn unknown_connect_services_are_unimplemented(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    for (path, content_type) in [
        ("no.such.v1.Service/Method", "application/json"),
        ("no.such.v1.Service/Method", "application/proto"),
        ("no.such.v1.Service/Watch", "application/connect+json"),
        ("grpc.health.v1.Health/Check", "application/json"),
    ] {
        let response = reqwest::Client::new()
            .post(format!("http://{}/{path}", daemon.addr))
            .header("content-type", content_type)
            .body("{}")
            .timeout(TIMEOUT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path} {content_type}");
        let error: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(error["code"], "unimplemented", "{path} {content_type}");
    }
    daemon.stop().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

async fn gzip_is_accepted_and_sent_on_every_grpc_service(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut actions = ActionsServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let mut reads = ReadServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let mut executors = ExecutorServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);

    actions.enqueue(padded_task("r1", 2000)).await.unwrap();
    let _watcher = Watcher::open(&mut actions, "r1", "a0").await;
    let got = reads
        .get_action(GetActionRequest {
            id: Some(aid("r1", "a0")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec.unwrap().action_id.unwrap().name, "a0");
    let mut lease = executors
        .lease(LeaseRequest {
            executor_id: "e1".into(),
            queue: "default".into(),
            capacity: 1,
            max_leases: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let leased = tokio::time::timeout(TIMEOUT, lease.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        leased.event,
        Some(lease_response::Event::Leased(_))
    ));
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();

    // On the wire: a gzip request is answered with a gzip response when
    // the client accepts it.
    let get = GetActionRequest {
        id: Some(aid("r1", "a0")),
    }
    .encode_to_vec();
    let response = h2()
        .post(format!("http://{}/{GET_ACTION}", daemon.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "gzip")
        .header("grpc-accept-encoding", "gzip")
        .body(grpc_frame(1, &gzip(&get)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-encoding"], "gzip");
    let body = response.bytes().await.unwrap();
    assert_eq!(body[0], 1, "the response message is compressed");
    drop(lease);
    daemon.stop().await;
}

async fn stopping_with_open_lease_and_watch_streams_is_prompt(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let shutdown_timeout = Duration::from_secs(5);
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    let mut executor = daemon.executor_client().await;
    let mut lease = executor
        .lease(LeaseRequest {
            executor_id: "e1".into(),
            queue: "default".into(),
            capacity: 1,
            max_leases: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(TIMEOUT, lease.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let started = Instant::now();
    let stopping = tokio::spawn(daemon.stop());
    // Both streams end with UNAVAILABLE (after whatever was in flight).
    let watch_end = loop {
        match tokio::time::timeout(TIMEOUT, watcher.stream.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(watch_end.code(), Code::Unavailable, "{watch_end:?}");
    let lease_end = loop {
        match tokio::time::timeout(TIMEOUT, lease.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the lease stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(lease_end.code(), Code::Unavailable, "{lease_end:?}");
    stopping.await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < shutdown_timeout / 2,
        "stopping took {elapsed:?} (shutdown_timeout {shutdown_timeout:?})"
    );
}

async fn stopping_while_writes_hang_takes_at_most_shutdown_timeout(db: TestDb) {
    let shutdown_timeout = Duration::from_secs(2);
    let daemon = Daemon::start_with(&db, |c| c.server.shutdown_timeout = shutdown_timeout).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let lock = WriteLock::take(&db).await;
    // A write that cannot finish while the lock is held.
    let mut writer = client.clone();
    let hung = tokio::spawn(async move { writer.enqueue(task("r1", "c1", Some("a0"))).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    daemon.stop().await;
    let elapsed = started.elapsed();
    lock.release().await;
    assert!(
        elapsed < shutdown_timeout + Duration::from_secs(1),
        "stopping took {elapsed:?} with shutdown_timeout {shutdown_timeout:?}"
    );
    // The caller of the hung write hears of it (it may or may not have
    // been committed: the daemon stopped before it answered).
    assert!(tokio::time::timeout(TIMEOUT, hung)
        .await
        .unwrap()
        .unwrap()
        .is_err());
}

/// The real binary, given a config file whose database_url line does not
/// parse, says where the error is and never prints the password.
#[tokio::test]
async fn a_config_file_that_fails_to_parse_never_prints_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("actionsd.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\ndatabase_url = \"postgres://actionsd:hunter2@db/actionsd\n",
    )
    .unwrap();
    let output = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_actionsd"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("ACTIONSD_DATABASE_URL")
            .output(),
    )
    .await
    .expect("actionsd exits")
    .unwrap();
    assert!(!output.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("line 2"), "{printed}");
}
