//! Requests, connections and pacing shared by the scenarios.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actionsd::proto::actionsd::executor::v1::executor_service_client::ExecutorServiceClient;
use actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use actionsd::proto::flyteidl2::actions::{action, Action, EnqueueRequest, UpdateRequest};
use actionsd::proto::flyteidl2::common::{ActionIdentifier, RunIdentifier};
use actionsd::proto::flyteidl2::task::TaskIdentifier;
use actionsd::proto::flyteidl2::workflow::{ActionStatus, TaskAction};
use anyhow::Context;
use bytes::Bytes;
use futures_util::future::try_join_all;
use tonic::transport::{Channel, Endpoint};

use crate::report::Latency;

pub type Actions = ActionsServiceClient<Channel>;
pub type Executors = ExecutorServiceClient<Channel>;

pub const PROJECT: &str = "bench";
pub const DOMAIN: &str = "development";

/// Every unary call gives up after this long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Phases as the wire numbers them.
pub mod phase {
    pub const QUEUED: i32 = 1;
    pub const WAITING_FOR_RESOURCES: i32 = 2;
    pub const INITIALIZING: i32 = 3;
    pub const RUNNING: i32 = 4;
    pub const SUCCEEDED: i32 = 5;
}

/// `n` HTTP/2 connections to `url`.
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .context("invalid server URL")?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    try_join_all((0..n.max(1)).map(|_| endpoint.connect()))
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

pub fn aid(run: &str, name: &str) -> ActionIdentifier {
    ActionIdentifier {
        run: Some(RunIdentifier {
            org: String::new(),
            project: PROJECT.to_owned(),
            domain: DOMAIN.to_owned(),
            name: run.to_owned(),
        }),
        name: name.to_owned(),
    }
}

/// An encoded flyteidl2.task.TaskSpec (opaque to actionsd) whose short
/// name pads it to about `size` bytes.
pub fn task_spec(size: usize) -> Bytes {
    // task_template {type: "python-task"}
    let mut spec = b"\n\r\x12\x0bpython-task".to_vec();
    let pad = size.saturating_sub(spec.len() + 3);
    spec.push(0x1a); // short_name, length-delimited
    prost::encoding::encode_varint(pad as u64, &mut spec);
    spec.resize(spec.len() + pad, b'x');
    Bytes::from(spec)
}

/// An Enqueue of a task action of about 1 KiB (its TaskSpec `spec`).
pub fn enqueue(run: &str, name: &str, parent: Option<&str>, spec: &Bytes) -> EnqueueRequest {
    EnqueueRequest {
        action: Some(Action {
            action_id: Some(aid(run, name)),
            parent_action_name: parent.map(str::to_owned),
            input_uri: format!("s3://bench/{run}/{name}/inputs.pb"),
            run_output_base: format!("s3://bench/{run}"),
            group: String::new(),
            subject: String::new(),
            spec: Some(action::Spec::Task(TaskAction {
                id: Some(TaskIdentifier {
                    org: String::new(),
                    project: PROJECT.to_owned(),
                    domain: DOMAIN.to_owned(),
                    name: "bench.noop".to_owned(),
                    version: "v1".to_owned(),
                }),
                spec: spec.clone(),
                cache_key: None,
                queue: String::new(),
            })),
            recovered_from: None,
        }),
        run_spec: Bytes::new(),
    }
}

/// The root `a0` of a run. It goes to a queue of its own that no bench
/// executor leases: the executors drain the children, and a finished root
/// would refuse further children.
pub fn root(run: &str, spec: &Bytes) -> EnqueueRequest {
    let mut request = enqueue(run, "a0", None, spec);
    if let Some(Action {
        spec: Some(action::Spec::Task(task)),
        ..
    }) = request.action.as_mut()
    {
        task.queue = "bench-roots".to_owned();
    }
    request
}

pub fn update(run: &str, name: &str, attempt: u32, phase: i32) -> UpdateRequest {
    UpdateRequest {
        address: None,
        action_id: Some(aid(run, name)),
        attempt,
        status: Some(ActionStatus {
            phase,
            start_time: None,
            end_time: None,
            attempts: attempt,
            cache_status: 0,
            duration_ms: None,
        }),
    }
}

pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Enqueues a root `a0` in each run, then `children` children under each
/// (`c0`, `c1`, …), 64 calls at a time. Setup, not measured.
pub async fn populate(
    channels: &[Channel],
    runs: &[String],
    children: usize,
    spec: &Bytes,
) -> anyhow::Result<()> {
    let mut roots = tokio::task::JoinSet::new();
    for (i, run) in runs.iter().enumerate() {
        let mut client = Actions::new(channels[i % channels.len()].clone());
        let request = root(run, spec);
        roots.spawn(async move { client.enqueue(crate::load::request(request)).await });
    }
    while let Some(result) = roots.join_next().await {
        result?.context("enqueue of a root")?;
    }
    let total = runs.len() * children;
    let workers = 64.min(total.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let mut client = Actions::new(channels[worker % channels.len()].clone());
        let runs = runs.to_vec();
        let spec = spec.clone();
        tasks.spawn(async move {
            let mut k = worker;
            while k < total {
                let (run, child) = (&runs[k % runs.len()], k / runs.len());
                let request = enqueue(run, &format!("c{child}"), Some("a0"), &spec);
                client
                    .enqueue(crate::load::request(request))
                    .await
                    .context("enqueue of a child")?;
                k += workers;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

/// Runs `op(worker, i)` for i = 0, 1, … on each of `workers` tasks, which
/// together start `rate` operations per second, until `duration` has passed
/// or `max_ops` operations have started. A worker's operations run one
/// after the other; a worker that falls behind catches up in a burst.
/// Returns how many operations completed and how long it took.
pub async fn paced<F, Fut>(
    workers: usize,
    rate: f64,
    duration: Duration,
    max_ops: usize,
    op: F,
) -> anyhow::Result<(usize, Duration)>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let period = Duration::from_secs_f64(workers as f64 / rate);
    let per_worker = max_ops.div_ceil(workers);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let op = op.clone();
        tasks.spawn(async move {
            // Spread the workers' ticks over one period.
            let offset = period.mul_f64(worker as f64 / workers as f64);
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            let mut done = 0;
            while done < per_worker {
                ticks.tick().await;
                if start.elapsed() >= duration {
                    break;
                }
                op(worker, done).await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok((total, start.elapsed()))
}

/// Matches two sightings of one event — the sender's acknowledgement and
/// the receiver's delivery, in either order — and records the time between
/// them (0 when delivery came first).
pub struct Matcher<K> {
    pending: Mutex<HashMap<K, Sighting>>,
    latency: Mutex<Latency>,
}

enum Sighting {
    Acknowledged(Instant),
    Delivered,
}

impl<K: Hash + Eq> Matcher<K> {
    pub fn new() -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            latency: Mutex::new(Latency::new()),
        }
    }

    pub fn acknowledged(&self, key: K) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.remove(&key) {
            Some(Sighting::Delivered) => self.record(Duration::ZERO),
            _ => {
                pending.insert(key, Sighting::Acknowledged(now));
            }
        }
    }

    pub fn delivered(&self, key: K) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.remove(&key) {
            Some(Sighting::Acknowledged(at)) => self.record(now.duration_since(at)),
            _ => {
                pending.insert(key, Sighting::Delivered);
            }
        }
    }

    fn record(&self, latency: Duration) {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(latency);
    }

    /// Acknowledged events not delivered (yet).
    pub fn undelivered(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| matches!(s, Sighting::Acknowledged(_)))
            .count()
    }

    pub fn latency(&self) -> Latency {
        let mut copy = Latency::new();
        copy.add(&self.latency.lock().unwrap_or_else(|e| e.into_inner()));
        copy
    }
}
