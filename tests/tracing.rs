//! OpenTelemetry: a daemon with `tracing.otlp_endpoint` set exports its
//! spans over OTLP/gRPC to a collector served here, each request's span a
//! child of the `traceparent` it came with, on gRPC, gRPC-Web and Connect.

mod common;

conformance!(traceparent_is_honoured_on_every_protocol_and_spans_reach_the_collector);

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actionsd::proto::actionsd::read::v1::ListRunsRequest;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A minimal OTLP trace collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traceparent_is_honoured_on_every_protocol_and_spans_reach_the_collector(db: TestDb) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The daemon runs as a process: trace export is set up with the global
    // subscriber, once per process.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("actionsd.toml");
    std::fs::write(
        &config,
        format!(
            "[tracing]\notlp_endpoint = \"http://{collector_addr}\"\nexport_timeout = \"5s\"\n"
        ),
    )
    .unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_actionsd"))
        .args(["serve", "--listen", &addr, "--database-url", &db.url()])
        .arg("--config")
        .arg(&config)
        .env_remove("ACTIONSD_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One trace per protocol: (trace id, the caller's span id).
    let calls: HashMap<&str, (String, String)> = [
        (
            "grpc",
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ),
        (
            "connect",
            ("5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"),
        ),
        (
            "grpc_web",
            ("6bf92f3577b34da6a3ce929d0e0e4738", "20f067aa0ba902b9"),
        ),
    ]
    .into_iter()
    .map(|(p, (t, s))| (p, (t.to_owned(), s.to_owned())))
    .collect();
    let traceparent = |protocol: &str| {
        let (trace, span) = &calls[protocol];
        format!("00-{trace}-{span}-01")
    };

    let mut client =
        actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient::connect(
            format!("http://{addr}"),
        )
        .await
        .unwrap();
    let mut request = tonic::Request::new(task("t1", "a0", None));
    request
        .metadata_mut()
        .insert("traceparent", traceparent("grpc").parse().unwrap());
    client.enqueue(request).await.unwrap();

    let read = format!("http://{addr}/actionsd.read.v1.ReadService/ListRuns");
    let connect = http
        .post(&read)
        .header("content-type", "application/json")
        .header("traceparent", traceparent("connect"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(connect.status(), 200);
    let message = ListRunsRequest::default().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let web = http
        .post(&read)
        .header("content-type", "application/grpc-web+proto")
        .header("traceparent", traceparent("grpc_web"))
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(web.status(), 200);
    let _ = web.bytes().await;

    // A graceful stop flushes the exporter.
    let pid = i32::try_from(daemon.id().unwrap()).unwrap();
    // SAFETY: signals the daemon this test started, by its own pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(TIMEOUT, daemon.wait())
        .await
        .expect("the daemon stops in time")
        .unwrap();
    assert!(status.success(), "{status:?}");

    let spans = collector.spans.lock().unwrap().clone();
    for (protocol, (trace, parent)) in &calls {
        let in_trace: Vec<&Span> = spans
            .iter()
            .filter(|s| hex(&s.trace_id) == *trace)
            .collect();
        let root = in_trace
            .iter()
            .find(|s| s.name.ends_with("/ListRuns") || s.name.ends_with("/Enqueue"))
            .unwrap_or_else(|| panic!("{protocol}: no request span in {in_trace:?}"));
        assert_eq!(hex(&root.parent_span_id), *parent, "{protocol}");
        // The RPC's own span nests under the request span.
        assert!(
            in_trace
                .iter()
                .any(|s| s.name == "rpc" && s.parent_span_id == root.span_id),
            "{protocol}: {in_trace:?}"
        );
        if *protocol == "grpc" {
            // The enqueue's store write is in the same trace.
            assert!(in_trace.len() >= 3, "{protocol}: {in_trace:?}");
        }
    }
    server.abort();
}
