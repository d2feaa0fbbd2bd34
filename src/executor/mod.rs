//! The reference executor: leases task actions from actionsd and runs a
//! shell command for each (`actionsd executor --exec '<command>'`), or the
//! task itself as a Flyte task process (`actionsd executor --flyte`, see
//! `flyte.rs` and `docs/flyte-executor.md`). The two differ only in what an
//! attempt runs and how its end is judged ([`Runner`]); what follows holds
//! for both, with the Flyte runner's differences described in `flyte.rs`.
//!
//! # What it does
//!
//! 1. It connects to actionsd over gRPC (one channel for
//!    `actionsd.executor.v1.ExecutorService` and
//!    `flyteidl2.actions.ActionsService`) and opens a lease stream
//!    (`Lease{executor_id, queue, capacity}`). When the stream fails or
//!    ends it opens another, after a backoff from 100 ms doubling up to 5 s,
//!    until the executor shuts down.
//! 2. For each leased action it decodes the enqueued
//!    `flyteidl2.actions.Action`, reports RUNNING with `Update` (the leased
//!    attempt, `start_time` now) and runs the command once as
//!    `sh -c <command>`, in a process group of its own, stdin closed,
//!    stdout inherited and stderr forwarded to the executor's stderr as it
//!    comes (its last 4 KiB are kept). The command's environment is the
//!    executor's plus:
//!
//!    | Variable | Value |
//!    | --- | --- |
//!    | `ACTIONSD_ORG`, `ACTIONSD_PROJECT`, `ACTIONSD_DOMAIN`, `ACTIONSD_RUN` | the run's identifier |
//!    | `ACTIONSD_ACTION` | the action's name |
//!    | `ACTIONSD_ATTEMPT` | the leased attempt, from 1 |
//!    | `ACTIONSD_INPUT_URI` | the action's `input_uri` |
//!    | `ACTIONSD_OUTPUT_URI` | where outputs go: `<run_output_base>/<action>/<attempt>` |
//!    | `ACTIONSD_RUN_OUTPUT_BASE` | the action's `run_output_base` |
//!    | `ACTIONSD_QUEUE` | the queue the executor leases from |
//!
//!    If the server refuses RUNNING for good (the action was aborted
//!    meanwhile, is gone, or the attempt is stale) the command does not
//!    run. If the server cannot be reached the command runs anyway.
//! 3. Exit status 0 is reported as `Finish{SUCCEEDED}` with the server's
//!    default `output_uri`. Any other status, or death by a signal, is
//!    `Finish{FAILED}` with a USER `ExecutionError` whose code is
//!    `ExitCode<n>` (or `Signal<n>`) and whose message is
//!    `command exited with status <n>: <end of stderr>`. When the executor
//!    itself cannot run the command, the error is a SYSTEM one.
//!    `Update` and `Finish` are retried on UNAVAILABLE and on timeouts, up
//!    to 5 tries; a FAILED_PRECONDITION from `Finish` (the action was
//!    aborted meanwhile) is logged and ignored. A `Finish` that never gets
//!    through leaves the lease to expire, and the server retries the action.
//! 4. While it holds leases it calls `Heartbeat` every `heartbeat_interval`.
//!    A cancellation, from a heartbeat or from the lease stream, stops the
//!    command: SIGTERM to its process group, SIGKILL after `kill_grace`.
//!    A cancelled attempt is never finished. A newer attempt of an action
//!    the executor runs cancels the older attempt the same way.
//! 5. On shutdown it drops the lease stream so no new work comes, lets the
//!    running commands finish (heartbeating meanwhile), reports them and
//!    returns. Actions already received when the stream closes are run too.
//!
//! At most `capacity` commands run at once; every unary call has a 10 s
//! deadline; channels between the executor's tasks are bounded.

mod action;
pub(crate) mod flyte;
mod heartbeat;
mod lease;
mod log;
mod process;
mod rpc;
pub mod ship;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use prost::Message;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::client::{AuthChannel as Channel, ClientSecurity};

use self::action::{ActionKey, Job};
use self::lease::LeaseEvent;
use crate::proto::actionsd::executor::v1::{
    executor_service_client::ExecutorServiceClient, Cancellation, LeasedAction,
};
use crate::proto::flyteidl2::actions::{actions_service_client::ActionsServiceClient, Action};

/// The largest message the executor accepts from actionsd. A leased
/// action carries the enqueued action and the run's RunSpec.
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Leases received but not yet taken up by the executor.
const LEASE_BUFFER: usize = 16;

/// Cancellations reported by heartbeats but not yet handled.
const CANCELLATION_BUFFER: usize = 64;

/// How the executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// actionsd's address, `http://host:port` or `https://host:port`.
    pub server: String,
    /// Token, CA certificate and client certificate for the connection.
    pub security: ClientSecurity,
    /// Unique per running executor process.
    pub executor_id: String,
    /// The queue to lease task actions from.
    pub queue: String,
    /// How many actions run at once (> 0), not counting those waiting on
    /// their children when `max_processes` is set.
    pub capacity: u32,
    /// With a value > 0: the hard bound on processes running at once,
    /// waiting parents included (>= capacity). A parent whose action has
    /// unfinished children then stops counting against `capacity`, so
    /// nested programs finish under any capacity. 0: every running process
    /// counts against `capacity`.
    pub max_processes: u32,
    /// What runs for each leased attempt.
    pub runner: Runner,
    /// How often leases are extended while the executor holds any.
    pub heartbeat_interval: Duration,
    /// How long a cancelled command has between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

/// What the executor runs for each leased attempt.
#[derive(Debug, Clone)]
pub enum Runner {
    /// `sh -c <command>`, the action described in `ACTIONSD_*` variables.
    Shell { command: String },
    /// The task's own container command, as a Flyte task process.
    Flyte(FlyteSettings),
}

/// How Flyte task processes run (`actionsd executor --flyte`).
#[derive(Debug, Clone)]
pub struct FlyteSettings {
    /// Looked in first for the task's program (`a0`): the `bin` directory
    /// of the environment with flyte installed. Else `PATH`.
    pub flyte_bin: Option<PathBuf>,
    /// Every attempt runs in this directory (a code root, for programs run
    /// without a code bundle). Else each attempt gets a fresh directory
    /// under `scratch_dir`, removed when it ends.
    pub workdir: Option<PathBuf>,
    /// Where the fresh per-attempt directories go.
    pub scratch_dir: PathBuf,
    /// Where each attempt's log goes: `<log_dir>/<run>/<action>/<attempt>.log`.
    pub log_dir: PathBuf,
    /// The size at which an attempt's log is rotated (one older file kept).
    pub log_max_bytes: u64,
    /// Added to every task process's environment, before the task's and
    /// the run's own: what the tasks need to reach the daemon's blob store.
    pub env: TaskEnv,
}

/// Environment variables for task processes; `Debug` shows only the names
/// (the values may be credentials).
#[derive(Clone, Default)]
pub struct TaskEnv(pub Vec<(String, String)>);

impl std::fmt::Debug for TaskEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl ExecutorSettings {
    /// The hard bound on processes, as sent to the server as `max_leases`.
    fn process_bound(&self) -> u32 {
        if self.max_processes == 0 {
            self.capacity
        } else {
            self.max_processes
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            !self.executor_id.is_empty(),
            "executor_id must not be empty"
        );
        ensure!(!self.queue.is_empty(), "queue must not be empty");
        ensure!(self.capacity > 0, "capacity must be at least 1");
        ensure!(
            self.max_processes == 0 || self.max_processes >= self.capacity,
            "max_processes must be 0 or at least the capacity"
        );
        match &self.runner {
            Runner::Shell { command } => {
                ensure!(!command.trim().is_empty(), "the command must not be empty");
            }
            Runner::Flyte(flyte) => {
                ensure!(flyte.log_max_bytes > 0, "log_max_bytes must be positive");
            }
        }
        ensure!(
            !self.heartbeat_interval.is_zero(),
            "heartbeat_interval must be positive"
        );
        Ok(())
    }
}

/// `<hostname>-<pid>`: the hostname from `/etc/hostname` or `HOSTNAME`,
/// else `executor`.
pub fn default_executor_id() -> String {
    let from_file = std::fs::read_to_string("/etc/hostname").ok();
    let from_env = || std::env::var("HOSTNAME").ok();
    let host = [from_file, from_env()]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "executor".to_owned());
    format!("{host}-{}", std::process::id())
}

/// What every task of the executor shares.
struct Context {
    settings: ExecutorSettings,
    executor: ExecutorServiceClient<Channel>,
    actions: ActionsServiceClient<Channel>,
    /// One permit per command allowed to run at once.
    slots: Arc<Semaphore>,
}

/// Runs the executor until `shutdown` is cancelled and its running actions
/// have finished. Fails only on invalid settings: an unreachable server is
/// retried.
pub async fn run(settings: ExecutorSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    settings.validate()?;
    let endpoint = Endpoint::from_shared(settings.server.clone())
        .with_context(|| format!("invalid server address {:?}", settings.server))?;
    let endpoint = settings.security.apply(endpoint, &settings.server)?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    // Lazy: the executor starts while actionsd is down and keeps trying.
    let channel = settings.security.wrap(endpoint.connect_lazy())?;
    tracing::info!(
        server = %settings.server,
        executor_id = %settings.executor_id,
        queue = %settings.queue,
        capacity = settings.capacity,
        "executor starting"
    );
    let ctx = Arc::new(Context {
        executor: ExecutorServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE),
        actions: ActionsServiceClient::new(channel),
        slots: Arc::new(Semaphore::new(settings.process_bound() as usize)),
        settings,
    });
    supervise(ctx, shutdown).await
}

/// The executor's main loop: takes leases, tracks the running actions,
/// hands cancellations to them, and drains on shutdown.
async fn supervise(ctx: Arc<Context>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (lease_tx, mut lease_rx) = mpsc::channel(LEASE_BUFFER);
    let lease_stop = CancellationToken::new();
    let lease_task = tokio::spawn(lease::run(ctx.clone(), lease_tx, lease_stop.clone()));

    let (cancel_tx, mut cancel_rx) = mpsc::channel(CANCELLATION_BUFFER);
    let (held_tx, held_rx) = watch::channel(0usize);
    let heartbeat_stop = CancellationToken::new();
    let heartbeat_task = tokio::spawn(heartbeat::run(
        ctx.clone(),
        held_rx,
        cancel_tx,
        heartbeat_stop.clone(),
    ));

    let mut running = Running::default();
    let mut leasing = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled(), if !lease_stop.is_cancelled() => {
                tracing::info!(
                    running = running.len(),
                    "shutting down: no new leases; waiting for running actions"
                );
                lease_stop.cancel();
            }
            event = lease_rx.recv(), if leasing => match event {
                Some(LeaseEvent::Leased(leased)) => running.start(&ctx, leased),
                Some(LeaseEvent::Cancelled(cancelled)) => running.cancel(&cancelled),
                None => leasing = false,
            },
            Some(cancelled) = cancel_rx.recv() => running.cancel(&cancelled),
            Some(joined) = running.tasks.join_next_with_id() => running.ended(joined),
            else => break,
        }
        held_tx.send_replace(running.len());
        if !leasing && running.len() == 0 {
            break;
        }
    }
    heartbeat_stop.cancel();
    let _ = heartbeat_task.await;
    let lease_ended = lease_task.await;
    ensure!(
        lease_stop.is_cancelled(),
        "the lease stream stopped unexpectedly: {lease_ended:?}"
    );
    tracing::info!("executor stopped");
    Ok(())
}

/// The attempts the executor holds, each run by one task.
#[derive(Default)]
struct Running {
    cancels: HashMap<(ActionKey, u32), CancellationToken>,
    by_task: HashMap<task::Id, (ActionKey, u32)>,
    tasks: JoinSet<()>,
}

impl Running {
    fn len(&self) -> usize {
        self.cancels.len()
    }

    fn start(&mut self, ctx: &Arc<Context>, leased: LeasedAction) {
        let id = leased.action_id.clone().or_else(|| {
            Action::decode(leased.action.clone())
                .ok()
                .and_then(|action| action.action_id)
        });
        let Some(id) = id else {
            tracing::error!("leased action names no action; ignoring it");
            return;
        };
        let key = ActionKey::from(&id);
        let attempt = leased.attempt;
        if self.cancels.contains_key(&(key.clone(), attempt)) {
            tracing::debug!(action = %key, attempt, "attempt leased again; already running it");
            return;
        }
        for ((held, held_attempt), cancel) in &self.cancels {
            if *held == key && *held_attempt < attempt && !cancel.is_cancelled() {
                tracing::info!(
                    action = %key,
                    attempt = held_attempt,
                    newer = attempt,
                    "a newer attempt was leased; stopping the stale one"
                );
                cancel.cancel();
            }
        }
        tracing::info!(action = %key, attempt, "leased");
        let cancel = CancellationToken::new();
        let job = Job {
            key: key.clone(),
            id,
            attempt,
            action: leased.action,
            output_uri: leased.output_uri,
            run_spec: leased.run_spec,
            leased_at: std::time::Instant::now(),
        };
        let handle = self
            .tasks
            .spawn(action::run(ctx.clone(), job, cancel.clone()));
        self.by_task.insert(handle.id(), (key.clone(), attempt));
        self.cancels.insert((key, attempt), cancel);
        if self.len() > ctx.settings.process_bound() as usize {
            tracing::warn!(
                held = self.len(),
                capacity = ctx.settings.process_bound(),
                "the server leased more actions than the capacity; the extra ones wait"
            );
        }
    }

    fn cancel(&self, cancellation: &Cancellation) {
        let Some(id) = &cancellation.action_id else {
            return;
        };
        let key = ActionKey::from(id);
        let mut known = false;
        for ((held, attempt), cancel) in &self.cancels {
            if *held == key && (cancellation.attempt == 0 || *attempt == cancellation.attempt) {
                known = true;
                if !cancel.is_cancelled() {
                    tracing::info!(
                        action = %key,
                        attempt,
                        reason = %cancellation.reason,
                        "cancelled by the server"
                    );
                    cancel.cancel();
                }
            }
        }
        if !known {
            tracing::debug!(
                action = %key,
                attempt = cancellation.attempt,
                "cancellation of an attempt this executor does not run"
            );
        }
    }

    fn ended(&mut self, joined: Result<(task::Id, ()), task::JoinError>) {
        let task = match joined {
            Ok((task, ())) => task,
            Err(err) => {
                tracing::error!(error = %err, "action task failed");
                err.id()
            }
        };
        if let Some(attempt) = self.by_task.remove(&task) {
            self.cancels.remove(&attempt);
        }
    }
}
