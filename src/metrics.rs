//! Prometheus metrics: the `metrics` facade with the Prometheus exporter's
//! recorder, rendered at `GET /metrics` (on the API port, or on an admin
//! listener of its own when `metrics.listen` is set).
//!
//! Every label has a bounded set of values: services and methods are those
//! of actionsd's descriptors (anything else is `unknown`), codes are the
//! 17 status codes, protocols three. No run, action or executor ids.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge, histogram};
use bytes::{Buf, Bytes};
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::rpc::status::connect_code;
use crate::store::{QueueStats, Store};

/// Names of every metric actionsd records.
pub mod names {
    pub const RPC_REQUESTS: &str = "actionsd_rpc_requests_total";
    pub const RPC_DURATION: &str = "actionsd_rpc_duration_seconds";
    pub const OPEN_STREAMS: &str = "actionsd_open_streams";
    pub const UPDATES_COALESCED: &str = "actionsd_updates_coalesced_total";
    pub const FEED_EVENTS: &str = "actionsd_feed_events_total";
    pub const FEED_FAILURES: &str = "actionsd_feed_read_failures_total";
    pub const FEED_LAG: &str = "actionsd_feed_lag_seconds";
    pub const COMMIT_BATCH_SIZE: &str = "actionsd_commit_batch_size";
    pub const COMMIT_DURATION: &str = "actionsd_commit_duration_seconds";
    pub const POOL_CONNECTIONS: &str = "actionsd_store_pool_connections";
    pub const POOL_MAX: &str = "actionsd_store_pool_max_connections";
    pub const STORE_UP: &str = "actionsd_store_up";
    pub const STORE_ROUND_TRIPS: &str = "actionsd_store_round_trips_total";
    pub const QUEUED_ACTIONS: &str = "actionsd_queued_actions";
    pub const OLDEST_QUEUED_AGE: &str = "actionsd_oldest_queued_age_seconds";
    pub const LEASES_HELD: &str = "actionsd_leases_held";
    pub const REAPER_RUNS: &str = "actionsd_reaper_runs_total";
    pub const REAPER_FAILURES: &str = "actionsd_reaper_failures_total";
    pub const LEASES_EXPIRED: &str = "actionsd_leases_expired_total";
    pub const LEASES_REQUEUED: &str = "actionsd_leases_requeued_total";
    pub const CONDITIONS_TIMED_OUT: &str = "actionsd_conditions_timed_out_total";
    pub const RETENTION_PASSES: &str = "actionsd_retention_passes_total";
    pub const RETENTION_FAILURES: &str = "actionsd_retention_failures_total";
    pub const RETENTION_DELETED: &str = "actionsd_retention_deleted_total";
    pub const RETENTION_DURATION: &str = "actionsd_retention_pass_duration_seconds";
    pub const AUTH_DENIED: &str = "actionsd_auth_denied_total";
    pub const LIMITED: &str = "actionsd_limit_exceeded_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        RPC_REQUESTS,
        RPC_DURATION,
        OPEN_STREAMS,
        UPDATES_COALESCED,
        FEED_EVENTS,
        FEED_FAILURES,
        FEED_LAG,
        COMMIT_BATCH_SIZE,
        COMMIT_DURATION,
        POOL_CONNECTIONS,
        POOL_MAX,
        STORE_UP,
        STORE_ROUND_TRIPS,
        QUEUED_ACTIONS,
        OLDEST_QUEUED_AGE,
        LEASES_HELD,
        REAPER_RUNS,
        REAPER_FAILURES,
        LEASES_EXPIRED,
        LEASES_REQUEUED,
        CONDITIONS_TIMED_OUT,
        RETENTION_PASSES,
        RETENTION_FAILURES,
        RETENTION_DELETED,
        RETENTION_DURATION,
        AUTH_DENIED,
        LIMITED,
    ];
}

/// Latency buckets, in seconds: 0.5 ms to 60 s.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Commands per group commit: powers of two up to the largest batch
/// setting worth having.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process-wide recorder: installed on first use, shared by every
/// daemon in the process (tests run several).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &BUCKETS)
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(names::COMMIT_BATCH_SIZE.to_owned()),
                &BATCH_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        process().describe();
        handle
    })
}

fn process() -> &'static metrics_process::Collector {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    PROCESS.get_or_init(metrics_process::Collector::default)
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::RPC_REQUESTS,
        "Finished RPCs by service, method, protocol and status code."
    );
    describe_histogram!(
        names::RPC_DURATION,
        Unit::Seconds,
        "RPC latency, from the request's arrival to the end of its response (a stream's whole life)."
    );
    describe_gauge!(names::OPEN_STREAMS, "Open server streams by method.");
    describe_counter!(
        names::UPDATES_COALESCED,
        "Pending stream updates replaced by a newer state of the same action before delivery."
    );
    describe_counter!(
        names::FEED_EVENTS,
        "Events read from the event log and handed to subscribers."
    );
    describe_counter!(names::FEED_FAILURES, "Failed reads of the event log.");
    describe_histogram!(
        names::FEED_LAG,
        Unit::Seconds,
        "From an event's write (its transaction's time) to its hand-over to the subscribers of this daemon."
    );
    describe_histogram!(
        names::COMMIT_BATCH_SIZE,
        Unit::Count,
        "Commands applied per group-commit transaction."
    );
    describe_histogram!(
        names::COMMIT_DURATION,
        Unit::Seconds,
        "Group-commit transaction latency, from taking the batch to its outcome."
    );
    describe_gauge!(
        names::POOL_CONNECTIONS,
        "Store pool connections by state (in_use, idle)."
    );
    describe_gauge!(names::POOL_MAX, "The store pool's connection limit.");
    describe_gauge!(
        names::STORE_UP,
        "1 while the store answers the health check, else 0."
    );
    describe_counter!(
        names::STORE_ROUND_TRIPS,
        "Statements the write path sent to the store (store = postgres or sqlite): \
         with the commands applied, how many round trips a command costs."
    );
    describe_gauge!(
        names::QUEUED_ACTIONS,
        "Queued task actions by queue (the fullest queues; sampled at scrape)."
    );
    describe_gauge!(
        names::OLDEST_QUEUED_AGE,
        Unit::Seconds,
        "Age of the oldest queued task action, by queue (sampled at scrape)."
    );
    describe_gauge!(
        names::LEASES_HELD,
        "Live leases held by executors (sampled at scrape)."
    );
    describe_counter!(names::REAPER_RUNS, "Reaper passes.");
    describe_counter!(names::REAPER_FAILURES, "Reaper passes that failed.");
    describe_counter!(
        names::LEASES_EXPIRED,
        "Leases that expired without a heartbeat (requeued or failed)."
    );
    describe_counter!(
        names::LEASES_REQUEUED,
        "Expired leases whose action was queued again."
    );
    describe_counter!(
        names::CONDITIONS_TIMED_OUT,
        "Conditions timed out before being signalled."
    );
    describe_counter!(names::RETENTION_PASSES, "Retention passes.");
    describe_counter!(names::RETENTION_FAILURES, "Retention passes that failed.");
    describe_counter!(
        names::RETENTION_DELETED,
        "Rows deleted by retention and by hand, by kind (runs, actions, events)."
    );
    describe_counter!(
        names::AUTH_DENIED,
        "Requests refused by authentication or authorization, by reason."
    );
    describe_counter!(
        names::LIMITED,
        "Requests refused RESOURCE_EXHAUSTED by a per-principal limit, by limit."
    );
    describe_histogram!(
        names::RETENTION_DURATION,
        Unit::Seconds,
        "How long a retention pass took."
    );
}

/// Queues reported by name at most; the queue label stays bounded.
const MAX_QUEUES: usize = 50;
/// How long a scrape waits for the store's queue counts.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Samples what is read rather than counted, then renders the exposition.
pub async fn render(store: &dyn Store) -> String {
    let handle = handle();
    match tokio::time::timeout(STATS_TIMEOUT, store.queue_stats(MAX_QUEUES)).await {
        Ok(Ok(stats)) => record_queues(&stats),
        Ok(Err(err)) => tracing::debug!(error = %err, "cannot count queued actions"),
        Err(_) => tracing::debug!("counting queued actions timed out"),
    }
    let pool = store.pool_stats();
    gauge!(names::POOL_CONNECTIONS, "state" => "in_use")
        .set(f64::from(pool.open.saturating_sub(pool.idle)));
    gauge!(names::POOL_CONNECTIONS, "state" => "idle").set(f64::from(pool.idle));
    gauge!(names::POOL_MAX).set(f64::from(pool.max));
    process().collect();
    handle.run_upkeep();
    handle.render()
}

/// Sets the queue gauges; queues no longer reported drop to 0.
fn record_queues(stats: &QueueStats) {
    static REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    let now = chrono::Utc::now();
    for gone in reported
        .iter()
        .filter(|q| !stats.queues.iter().any(|d| &d.queue == *q))
    {
        gauge!(names::QUEUED_ACTIONS, "queue" => gone.clone()).set(0.0);
        gauge!(names::OLDEST_QUEUED_AGE, "queue" => gone.clone()).set(0.0);
    }
    reported.clear();
    for depth in &stats.queues {
        let age = (now - depth.oldest).num_milliseconds().max(0) as f64 / 1000.0;
        gauge!(names::QUEUED_ACTIONS, "queue" => depth.queue.clone()).set(depth.queued as f64);
        gauge!(names::OLDEST_QUEUED_AGE, "queue" => depth.queue.clone()).set(age);
        reported.push(depth.queue.clone());
    }
    gauge!(names::LEASES_HELD).set(stats.leases_held as f64);
}

/// The response to `GET /metrics`.
pub async fn endpoint(store: &dyn Store) -> Response<Body> {
    let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from(
        render(store).await,
    ))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves `/metrics` and nothing else (the admin listener).
#[derive(Clone)]
pub struct AdminService {
    pub store: Arc<dyn Store>,
}

impl Service<Request<Body>> for AdminService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let store = self.store.clone();
        Box::pin(async move {
            if request.uri().path() == "/metrics" && request.method() == Method::GET {
                Ok(endpoint(store.as_ref()).await)
            } else {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::NOT_FOUND;
                Ok(response)
            }
        })
    }
}

/// A known RPC method's labels.
#[derive(Clone, Copy)]
struct MethodLabels {
    service: &'static str,
    method: &'static str,
    streaming: bool,
}

/// Every RPC path actionsd serves, from its descriptors.
fn methods() -> &'static HashMap<String, MethodLabels> {
    static METHODS: OnceLock<HashMap<String, MethodLabels>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(pool) = prost_reflect::DescriptorPool::decode(set) else {
                continue;
            };
            for service in pool.services() {
                let service_name: &'static str = service.full_name().to_owned().leak();
                for method in service.methods() {
                    let method_name: &'static str = method.name().to_owned().leak();
                    methods.insert(
                        format!("/{service_name}/{method_name}"),
                        MethodLabels {
                            service: service_name,
                            method: method_name,
                            streaming: method.is_server_streaming(),
                        },
                    );
                }
            }
        }
        methods
    })
}

const UNKNOWN: MethodLabels = MethodLabels {
    service: "unknown",
    method: "unknown",
    streaming: false,
};

/// The wire protocol of a call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    GrpcWeb,
    Connect,
    ConnectStream,
}

impl Protocol {
    fn of(request: &Request<Body>) -> Self {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.starts_with("application/grpc-web") {
            Self::GrpcWeb
        } else if content_type.starts_with("application/grpc") {
            Self::Grpc
        } else if content_type.starts_with("application/connect+") {
            Self::ConnectStream
        } else {
            Self::Connect
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::GrpcWeb => "grpc_web",
            Self::Connect | Self::ConnectStream => "connect",
        }
    }
}

/// Counts and times every RPC, on every protocol; answers `GET /metrics`
/// when the endpoint is on this port. The outermost layer, so calls the
/// edge refuses (timeouts, limits) are counted too.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    /// Serve `/metrics` here (no admin listener).
    endpoint: Option<Arc<dyn Store>>,
}

impl RpcMetricsLayer {
    pub fn new(endpoint: Option<Arc<dyn Store>>) -> Self {
        handle();
        methods();
        Self { endpoint }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            endpoint: self.endpoint.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    endpoint: Option<Arc<dyn Store>>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for RpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if let Some(store) = &self.endpoint {
            if request.uri().path() == "/metrics" && request.method() == Method::GET {
                let store = store.clone();
                return Box::pin(async move { Ok(endpoint(store.as_ref()).await) });
            }
        }
        let labels = methods()
            .get(request.uri().path())
            .copied()
            .unwrap_or(UNKNOWN);
        let protocol = Protocol::of(&request);
        let started = Instant::now();
        if labels.streaming {
            gauge!(names::OPEN_STREAMS, "method" => labels.method).increment(1.0);
        }
        let call = Call {
            labels,
            protocol,
            started,
            code: None,
            done: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let mut call = call;
            call.read_head(&response);
            Ok(response.map(|body| Body::new(Observed { inner: body, call })))
        })
    }
}

/// One call in flight; records itself when its response ends or is
/// dropped.
struct Call {
    labels: MethodLabels,
    protocol: Protocol,
    started: Instant,
    code: Option<&'static str>,
    done: bool,
}

fn code_name(code: Code) -> &'static str {
    connect_code(code).0
}

/// A Connect code name from a client-visible body, kept only when it is
/// one of the 17 (bounded labels).
fn known_code(name: &str) -> &'static str {
    (0..=16)
        .map(|n| code_name(Code::from_i32(n)))
        .find(|known| *known == name)
        .unwrap_or("unknown")
}

impl Call {
    fn read_head(&mut self, response: &Response<Body>) {
        if let Some(status) = Status::from_header_map(response.headers()) {
            self.code = Some(code_name(status.code()));
            return;
        }
        if self.protocol == Protocol::Connect && response.status() == StatusCode::OK {
            self.code = Some("ok");
        }
        if self.labels.service == "unknown" && response.status() == StatusCode::NOT_FOUND {
            self.code = Some(code_name(Code::Unimplemented));
        }
    }

    /// Reads the status from a response frame, per protocol. The envelope
    /// formats (gRPC-Web's trailer frame, Connect's end-of-stream message
    /// and unary error body) are parsed here because no library exposes
    /// them on an observed body.
    fn read_frame(&mut self, frame: &Frame<Bytes>) {
        if self.code.is_some() {
            return;
        }
        if let Some(trailers) = frame.trailers_ref() {
            if let Some(status) = Status::from_header_map(trailers) {
                self.code = Some(code_name(status.code()));
            }
            return;
        }
        let Some(data) = frame.data_ref() else {
            return;
        };
        match self.protocol {
            Protocol::GrpcWeb if data.len() > 5 && data[0] & 0x80 != 0 => {
                let text = String::from_utf8_lossy(&data[5..]);
                for line in text.split("\r\n") {
                    if let Some(value) = line.strip_prefix("grpc-status:") {
                        if let Ok(n) = value.trim().parse::<i32>() {
                            self.code = Some(code_name(Code::from_i32(n)));
                        }
                    }
                }
            }
            Protocol::ConnectStream if data.len() >= 5 && data[0] & 0x02 != 0 => {
                let mut payload = data.clone();
                payload.advance(5);
                let end: serde_json::Value =
                    serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null);
                self.code = Some(match end.pointer("/error/code").and_then(|c| c.as_str()) {
                    Some(name) => known_code(name),
                    None => "ok",
                });
            }
            Protocol::Connect => {
                let error: serde_json::Value =
                    serde_json::from_slice(data).unwrap_or(serde_json::Value::Null);
                self.code = Some(
                    error
                        .get("code")
                        .and_then(|c| c.as_str())
                        .map_or("unknown", known_code),
                );
            }
            _ => {}
        }
    }

    fn finish(&mut self, ended: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code = self.code.unwrap_or(if ended {
            "unknown"
        } else {
            code_name(Code::Cancelled)
        });
        let labels = [
            ("service", self.labels.service),
            ("method", self.labels.method),
            ("protocol", self.protocol.label()),
        ];
        counter!(
            names::RPC_REQUESTS,
            &[labels[0], labels[1], labels[2], ("code", code)]
        )
        .increment(1);
        histogram!(names::RPC_DURATION, &labels).record(self.started.elapsed().as_secs_f64());
        if self.labels.streaming {
            gauge!(names::OPEN_STREAMS, "method" => self.labels.method).decrement(1.0);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(false);
    }
}

struct Observed {
    inner: Body,
    call: Call,
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.call.read_frame(frame);
                if this.inner.is_end_stream() {
                    this.call.finish(true);
                }
            }
            Poll::Ready(None) => this.call.finish(true),
            Poll::Ready(Some(Err(status))) => {
                this.call.code.get_or_insert(code_name(status.code()));
                this.call.finish(true);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
