//! One leased attempt: report RUNNING, run the command, report how it ended.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use super::flyte;
use super::log::{RotatingFile, SharedLog, Shipped};
use super::process::{self, Exit};
use super::rpc;
use super::ship::{LogShipper, ShipperTask};
use super::{Context, Runner};
use crate::proto::actionsd::executor::v1::FinishRequest;
use crate::proto::flyteidl2::actions::{Action, UpdateRequest};
use crate::proto::flyteidl2::common::{ActionIdentifier, ActionPhase};
use crate::proto::flyteidl2::core::{execution_error::ErrorKind, ExecutionError};
use crate::proto::flyteidl2::workflow::ActionStatus;

/// How long to wait, once a command exited, for the rest of its stderr.
const STDERR_PATIENCE: Duration = Duration::from_secs(2);

/// Identifies an action in logs and in the executor's bookkeeping:
/// `org/project/domain/run/action`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ActionKey {
    org: String,
    project: String,
    domain: String,
    run: String,
    name: String,
}

impl From<&ActionIdentifier> for ActionKey {
    fn from(id: &ActionIdentifier) -> Self {
        let run = id.run.clone().unwrap_or_default();
        Self {
            org: run.org,
            project: run.project,
            domain: run.domain,
            run: run.name,
            name: id.name.clone(),
        }
    }
}

impl fmt::Display for ActionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}/{}",
            self.org, self.project, self.domain, self.run, self.name
        )
    }
}

/// A leased attempt, as the executor runs it.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) key: ActionKey,
    pub(super) id: ActionIdentifier,
    pub(super) attempt: u32,
    /// The encoded `flyteidl2.actions.Action`.
    pub(super) action: Bytes,
    pub(super) output_uri: String,
    /// The run's encoded RunSpec.
    pub(super) run_spec: Bytes,
    /// The run-scoped credential the daemon minted for this attempt
    /// (authentication on), handed to a Flyte task process.
    pub(super) task_credential: Option<crate::proto::actionsd::executor::v1::TaskCredential>,
    /// When the lease arrived.
    pub(super) leased_at: Instant,
}

/// The environment of an action's command, added to the executor's own.
pub(super) fn command_env(
    action: &Action,
    id: &ActionIdentifier,
    attempt: u32,
    output_uri: &str,
    queue: &str,
) -> Vec<(&'static str, String)> {
    let run = id.run.clone().unwrap_or_default();
    vec![
        ("ACTIONSD_ORG", run.org),
        ("ACTIONSD_PROJECT", run.project),
        ("ACTIONSD_DOMAIN", run.domain),
        ("ACTIONSD_RUN", run.name),
        ("ACTIONSD_ACTION", id.name.clone()),
        ("ACTIONSD_ATTEMPT", attempt.to_string()),
        ("ACTIONSD_INPUT_URI", action.input_uri.clone()),
        ("ACTIONSD_OUTPUT_URI", output_uri.to_owned()),
        ("ACTIONSD_RUN_OUTPUT_BASE", action.run_output_base.clone()),
        ("ACTIONSD_QUEUE", queue.to_owned()),
    ]
}

/// The error reported for a command that did not exit with status 0.
pub(super) fn command_error(
    exit: Exit,
    stderr_tail: &str,
    worker: &str,
    now: SystemTime,
) -> ExecutionError {
    let (code, what) = match exit {
        Exit::Code(n) => (
            format!("ExitCode{n}"),
            format!("command exited with status {n}"),
        ),
        Exit::Signal(n) => (
            format!("Signal{n}"),
            format!("command was killed by signal {n}"),
        ),
    };
    let message = if stderr_tail.is_empty() {
        what
    } else {
        format!("{what}: {stderr_tail}")
    };
    ExecutionError {
        code,
        message,
        kind: ErrorKind::User as i32,
        timestamp: Some(now.into()),
        worker: worker.to_owned(),
        ..ExecutionError::default()
    }
}

/// The error reported when the executor itself could not run the command.
pub(super) fn system_error(
    code: &str,
    message: String,
    worker: &str,
    now: SystemTime,
) -> ExecutionError {
    ExecutionError {
        code: code.to_owned(),
        message,
        kind: ErrorKind::System as i32,
        timestamp: Some(now.into()),
        worker: worker.to_owned(),
        ..ExecutionError::default()
    }
}

/// Runs one leased attempt to its end. A cancelled attempt is stopped and
/// never finished: the server already knows how it ended.
pub(super) async fn run(ctx: Arc<Context>, job: Job, cancel: CancellationToken) {
    let span = tracing::info_span!("action", action = %job.key, attempt = job.attempt);
    run_inner(&ctx, &job, &cancel).instrument(span).await;
}

/// How an attempt's process is judged once it exited by itself.
enum Judge {
    /// Exit status 0 succeeds; anything else is a USER error.
    Shell,
    /// `error.pb` under the output prefix, then the exit status.
    Flyte { output_prefix: String, retries: u32 },
}

/// An attempt ready to start.
struct Prepared {
    spec: process::Spec,
    timeout: Option<Duration>,
    judge: Judge,
    /// A fresh working directory, removed when the attempt ends.
    scratch: Option<PathBuf>,
    /// Ships the attempt's output to actionsd (Flyte tasks).
    shipping: Option<ShipperTask>,
}

/// How long the rest of an attempt's output may take to reach actionsd.
const SHIP_PATIENCE: Duration = Duration::from_secs(10);

impl Prepared {
    /// Sends the rest of the attempt's output before its end is reported.
    async fn close_log(&self) {
        if let Some(shipping) = &self.shipping {
            let stats = shipping.finish(SHIP_PATIENCE).await;
            tracing::debug!(
                sent = stats.lines_sent,
                dropped = stats.lines_dropped,
                "log shipped"
            );
        }
    }

    fn cleanup(&self) {
        if let Some(dir) = &self.scratch {
            if let Err(err) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot remove the attempt's directory");
            }
        }
    }
}

/// Turns a leased attempt into what to run. An error is how the attempt
/// finishes without running.
fn prepare(ctx: &Context, job: &Job, action: &Action) -> Result<Prepared, Box<ExecutionError>> {
    let worker = &ctx.settings.executor_id;
    match &ctx.settings.runner {
        Runner::Shell { command } => {
            let env = command_env(
                action,
                &job.id,
                job.attempt,
                &job.output_uri,
                &ctx.settings.queue,
            )
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            Ok(Prepared {
                spec: process::Spec::shell(command, env),
                timeout: None,
                judge: Judge::Shell,
                scratch: None,
                shipping: None,
            })
        }
        Runner::Flyte(settings) => {
            let task = flyte::task(action).map_err(|err| {
                Box::new(ExecutionError {
                    code: err.code().to_owned(),
                    message: err.to_string(),
                    kind: ErrorKind::User as i32,
                    timestamp: Some(SystemTime::now().into()),
                    worker: worker.clone(),
                    ..ExecutionError::default()
                })
            })?;
            let run = job.id.run.clone().unwrap_or_default();
            let run_settings = flyte::run_settings(&job.run_spec);
            let values = flyte::Placeholders::new(
                action,
                &run_settings,
                &run.name,
                &job.id.name,
                job.attempt,
                &job.output_uri,
            );
            let who = flyte::Identity {
                org: &run.org,
                project: &run.project,
                domain: &run.domain,
                run: &run.name,
                action: &job.id.name,
                run_output_base: &action.run_output_base,
            };
            let mut env = settings.env.0.clone();
            env.extend(flyte::environment(
                &task,
                &run_settings,
                &who,
                &ctx.settings.server,
                job.task_credential.as_ref(),
            ));
            // The SDK in the task verifies the daemon's certificate against
            // its trust store: add the executor's --ca-cert to it.
            if let (true, Some(ca)) = (
                ctx.settings.server.starts_with("https://"),
                ctx.settings.security.ca_cert.as_deref(),
            ) {
                match flyte::trust_bundle(ca, &settings.scratch_dir) {
                    Ok(bundle) => env.push((
                        "SSL_CERT_FILE".to_owned(),
                        bundle.to_string_lossy().into_owned(),
                    )),
                    Err(err) => tracing::warn!(
                        error = %err,
                        "cannot write the trust bundle for task processes; they use the system's roots"
                    ),
                }
            }
            let mut argv = task.argv.iter().map(|arg| values.fill(arg));
            let program = argv.next().unwrap_or_default();
            let program = flyte::program(&program, settings.flyte_bin.as_deref());
            let args: Vec<String> = argv.collect();
            let system = |code: &str, message: String| {
                Box::new(system_error(code, message, worker, SystemTime::now()))
            };
            let unique = format!("{}-{}-{}", run.name, job.id.name, job.attempt).replace('/', "_");
            let (cwd, scratch) = match &settings.workdir {
                Some(dir) => (dir.clone(), None),
                None => {
                    let dir = settings.scratch_dir.join(&unique);
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).map_err(|err| {
                        system(
                            "WorkdirNotCreated",
                            format!("cannot create {}: {err}", dir.display()),
                        )
                    })?;
                    (dir.clone(), Some(dir))
                }
            };
            let log_path = settings
                .log_dir
                .join(run.name.replace('/', "_"))
                .join(job.id.name.replace('/', "_"))
                .join(format!("{}.log", job.attempt));
            let log = RotatingFile::create(&log_path, settings.log_max_bytes).map_err(|err| {
                system(
                    "LogNotCreated",
                    format!("cannot create the log {}: {err}", log_path.display()),
                )
            })?;
            tracing::debug!(log = %log_path.display(), program = %program.display(), "prepared");
            let (shipper, shipping) = LogShipper::start(
                ctx.executor.clone(),
                ctx.settings.executor_id.clone(),
                job.id.clone(),
                job.attempt,
            );
            let log: SharedLog = Arc::new(Mutex::new(Shipped { file: log, shipper }));
            Ok(Prepared {
                spec: process::Spec {
                    program,
                    args,
                    env,
                    cwd: Some(cwd),
                    log: Some(log),
                },
                timeout: task.timeout,
                judge: Judge::Flyte {
                    output_prefix: job.output_uri.clone(),
                    retries: task.retries,
                },
                scratch,
                shipping: Some(shipping),
            })
        }
    }
}

async fn run_inner(ctx: &Context, job: &Job, cancel: &CancellationToken) {
    let _slot = tokio::select! {
        () = cancel.cancelled() => {
            tracing::info!("cancelled before it started");
            return;
        }
        slot = ctx.slots.clone().acquire_owned() => match slot {
            Ok(slot) => slot,
            Err(_) => return,
        },
    };
    let action = match Action::decode(job.action.clone()) {
        Ok(action) => action,
        Err(err) => {
            tracing::error!(error = %err, "cannot decode the leased action");
            let error = system_error(
                "InvalidAction",
                format!("the executor cannot decode the action: {err}"),
                &ctx.settings.executor_id,
                SystemTime::now(),
            );
            finish(ctx, job, ActionPhase::Failed, Some(error), false).await;
            return;
        }
    };
    let prepared = match prepare(ctx, job, &action) {
        Ok(prepared) => prepared,
        Err(error) => {
            tracing::warn!(code = %error.code, message = %error.message, "cannot run the attempt");
            finish(ctx, job, ActionPhase::Failed, Some(*error), false).await;
            return;
        }
    };
    if !report_running(ctx, job).await || cancel.is_cancelled() {
        prepared.cleanup();
        return;
    }
    run_prepared(ctx, job, cancel, &prepared).await;
    prepared.cleanup();
}

async fn run_prepared(ctx: &Context, job: &Job, cancel: &CancellationToken, prepared: &Prepared) {
    let mut command = match process::Command::spawn(prepared.spec.clone()) {
        Ok(command) => command,
        Err(err) => {
            tracing::error!(error = %err, program = %prepared.spec.program.display(), "cannot start the process");
            let error = system_error(
                "CommandNotStarted",
                format!(
                    "the executor cannot start {}: {err}",
                    prepared.spec.program.display()
                ),
                &ctx.settings.executor_id,
                SystemTime::now(),
            );
            finish(ctx, job, ActionPhase::Failed, Some(error), false).await;
            return;
        }
    };
    tracing::info!(
        pid = command.id(),
        spawn_latency_us = u64::try_from(job.leased_at.elapsed().as_micros()).unwrap_or(u64::MAX),
        "process started"
    );
    let deadline = async {
        match prepared.timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let exit = tokio::select! {
        exit = command.wait() => exit,
        () = cancel.cancelled() => {
            tracing::info!("cancelled; stopping the process");
            match command.terminate(ctx.settings.kill_grace).await {
                Ok(exit) => tracing::info!(?exit, "process stopped"),
                Err(err) => tracing::warn!(error = %err, "cannot wait for the stopped process"),
            }
            return;
        }
        () = deadline => {
            let timeout = prepared.timeout.unwrap_or_default();
            tracing::info!(?timeout, "timed out; stopping the process");
            match command.terminate(ctx.settings.kill_grace).await {
                Ok(exit) => tracing::info!(?exit, "process stopped"),
                Err(err) => tracing::warn!(error = %err, "cannot wait for the stopped process"),
            }
            if !cancel.is_cancelled() {
                prepared.close_log().await;
                let error = flyte::timeout_error(timeout, &ctx.settings.executor_id, SystemTime::now());
                finish(ctx, job, ActionPhase::TimedOut, Some(error), false).await;
            }
            return;
        }
    };
    let stderr_tail = command.stderr_tail(STDERR_PATIENCE).await;
    let exit = match exit {
        Ok(exit) => exit,
        Err(err) => {
            tracing::error!(error = %err, "cannot wait for the process");
            let error = system_error(
                "CommandLost",
                format!("the executor cannot wait for the process: {err}"),
                &ctx.settings.executor_id,
                SystemTime::now(),
            );
            finish(ctx, job, ActionPhase::Failed, Some(error), false).await;
            return;
        }
    };
    tracing::info!(?exit, "process exited");
    prepared.close_log().await;
    if cancel.is_cancelled() {
        tracing::info!("cancelled while it ended; not reporting it");
        return;
    }
    let worker = &ctx.settings.executor_id;
    match &prepared.judge {
        Judge::Shell if exit.success() => {
            finish(ctx, job, ActionPhase::Succeeded, None, false).await
        }
        Judge::Shell => {
            let error = command_error(exit, &stderr_tail, worker, SystemTime::now());
            finish(ctx, job, ActionPhase::Failed, Some(error), false).await;
        }
        Judge::Flyte {
            output_prefix,
            retries,
        } => {
            let document = match flyte::read_error(output_prefix) {
                Ok(document) => document,
                Err(err) => {
                    let error = system_error(
                        "ErrorDocumentUnreadable",
                        format!("cannot read {output_prefix}/error.pb: {err}"),
                        worker,
                        SystemTime::now(),
                    );
                    finish(ctx, job, ActionPhase::Failed, Some(error), false).await;
                    return;
                }
            };
            let outputs_written = document.is_none() && flyte::outputs_written(output_prefix);
            if outputs_written && !exit.success() {
                tracing::warn!(
                    ?exit,
                    stderr = %stderr_tail,
                    "the task process died after writing its outputs; the task succeeded"
                );
            }
            let judged = flyte::outcome(
                exit,
                document
                    .as_ref()
                    .map(|(path, bytes)| (path.as_path(), bytes.as_slice())),
                outputs_written,
                &stderr_tail,
                job.attempt,
                *retries,
                worker,
                SystemTime::now(),
            );
            match judged {
                flyte::Outcome::Succeeded => {
                    finish(ctx, job, ActionPhase::Succeeded, None, false).await;
                }
                flyte::Outcome::Failed { error, retry } => {
                    tracing::info!(code = %error.code, retry, "the task failed");
                    finish(ctx, job, ActionPhase::Failed, Some(error), retry).await;
                }
            }
        }
    }
}

/// Reports RUNNING. False when the server refuses it for good (the action
/// was aborted, is gone or this attempt is stale): then the command must
/// not run. When the server cannot be reached the command runs anyway;
/// the lease, kept by heartbeats, still holds.
async fn report_running(ctx: &Context, job: &Job) -> bool {
    let request = UpdateRequest {
        address: None,
        action_id: Some(job.id.clone()),
        attempt: job.attempt,
        status: Some(ActionStatus {
            phase: ActionPhase::Running as i32,
            start_time: Some(SystemTime::now().into()),
            attempts: job.attempt,
            ..ActionStatus::default()
        }),
    };
    let result = rpc::with_retries("Update", rpc::report_backoff(), || {
        let mut client = ctx.actions.clone();
        let request = rpc::request(request.clone());
        async move { rpc::call(client.update(request)).await }
    })
    .await;
    match result {
        Ok(_) => true,
        Err(status) if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) => {
            tracing::info!(
                code = ?status.code(),
                message = status.message(),
                "the server refused RUNNING; not running the command"
            );
            false
        }
        Err(status) => {
            tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                "cannot report RUNNING; running the command anyway"
            );
            true
        }
    }
}

/// Reports the terminal phase, with the server's default output_uri; with
/// `retry`, a failure that the server turns into the next attempt.
async fn finish(
    ctx: &Context,
    job: &Job,
    phase: ActionPhase,
    error: Option<ExecutionError>,
    retry: bool,
) {
    let request = FinishRequest {
        executor_id: ctx.settings.executor_id.clone(),
        action_id: Some(job.id.clone()),
        attempt: job.attempt,
        phase: phase as i32,
        output_uri: String::new(),
        error,
        retry,
    };
    let result = rpc::with_retries("Finish", rpc::report_backoff(), || {
        let mut client = ctx.executor.clone();
        let request = rpc::request(request.clone());
        async move { rpc::call(client.finish(request)).await }
    })
    .await;
    match result {
        Ok(_) if retry => tracing::info!("finished; the next attempt is queued"),
        Ok(_) => tracing::info!(phase = phase.as_str_name(), "finished"),
        Err(status) if status.code() == Code::FailedPrecondition => tracing::info!(
            phase = phase.as_str_name(),
            message = status.message(),
            "the server refused Finish (the action was aborted or this attempt is stale)"
        ),
        Err(status) => tracing::error!(
            phase = phase.as_str_name(),
            code = ?status.code(),
            message = status.message(),
            "cannot report Finish; the lease will expire and the server will retry the action"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::proto::flyteidl2::common::RunIdentifier;

    fn id() -> ActionIdentifier {
        ActionIdentifier {
            run: Some(RunIdentifier {
                org: "acme".into(),
                project: "flytesnacks".into(),
                domain: "development".into(),
                name: "r1".into(),
            }),
            name: "a0".into(),
        }
    }

    #[test]
    fn the_environment_names_the_action_and_its_uris() {
        let action = Action {
            action_id: Some(id()),
            input_uri: "s3://bucket/r1/a0/inputs.pb".into(),
            run_output_base: "s3://bucket/r1".into(),
            ..Action::default()
        };
        let env = command_env(&action, &id(), 2, "s3://bucket/r1/a0/2", "gpu");
        let expected = [
            ("ACTIONSD_ORG", "acme"),
            ("ACTIONSD_PROJECT", "flytesnacks"),
            ("ACTIONSD_DOMAIN", "development"),
            ("ACTIONSD_RUN", "r1"),
            ("ACTIONSD_ACTION", "a0"),
            ("ACTIONSD_ATTEMPT", "2"),
            ("ACTIONSD_INPUT_URI", "s3://bucket/r1/a0/inputs.pb"),
            ("ACTIONSD_OUTPUT_URI", "s3://bucket/r1/a0/2"),
            ("ACTIONSD_RUN_OUTPUT_BASE", "s3://bucket/r1"),
            ("ACTIONSD_QUEUE", "gpu"),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn an_action_without_a_run_gets_empty_run_variables() {
        let bare = ActionIdentifier {
            run: None,
            name: "a0".into(),
        };
        let env = command_env(&Action::default(), &bare, 1, "", "default");
        assert!(env
            .iter()
            .filter(|(k, _)| ["ACTIONSD_ORG", "ACTIONSD_RUN"].contains(k))
            .all(|(_, v)| v.is_empty()));
    }

    #[test]
    fn a_non_zero_exit_is_a_user_error_with_the_stderr_tail() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let error = command_error(Exit::Code(3), "boom: no such file", "host-42", now);
        assert_eq!(error.code, "ExitCode3");
        assert_eq!(
            error.message,
            "command exited with status 3: boom: no such file"
        );
        assert_eq!(error.kind, ErrorKind::User as i32);
        assert_eq!(error.worker, "host-42");
        assert_eq!(error.timestamp, Some(now.into()));
    }

    #[test]
    fn a_signal_is_named_and_an_empty_tail_is_left_out() {
        let error = command_error(Exit::Signal(9), "", "host-42", SystemTime::now());
        assert_eq!(error.code, "Signal9");
        assert_eq!(error.message, "command was killed by signal 9");
        assert_eq!(error.kind, ErrorKind::User as i32);
    }

    #[test]
    fn executor_failures_are_system_errors() {
        let error = system_error("CommandNotStarted", "no sh".into(), "w", SystemTime::now());
        assert_eq!(error.kind, ErrorKind::System as i32);
        assert_eq!(error.code, "CommandNotStarted");
    }

    #[test]
    fn keys_print_the_full_action_path() {
        assert_eq!(
            ActionKey::from(&id()).to_string(),
            "acme/flytesnacks/development/r1/a0"
        );
    }
}
