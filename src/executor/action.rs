//! One leased attempt: report RUNNING, run the command, report how it ended.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use super::process::{self, Exit};
use super::rpc;
use super::Context;
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
            finish(ctx, job, ActionPhase::Failed, Some(error)).await;
            return;
        }
    };
    if !report_running(ctx, job).await || cancel.is_cancelled() {
        return;
    }
    let env = command_env(
        &action,
        &job.id,
        job.attempt,
        &job.output_uri,
        &ctx.settings.queue,
    );
    let mut command = match process::Command::spawn(&ctx.settings.command, &env) {
        Ok(command) => command,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the command");
            let error = system_error(
                "CommandNotStarted",
                format!("the executor cannot start the command: {err}"),
                &ctx.settings.executor_id,
                SystemTime::now(),
            );
            finish(ctx, job, ActionPhase::Failed, Some(error)).await;
            return;
        }
    };
    tracing::info!("command started");
    let exit = tokio::select! {
        exit = command.wait() => exit,
        () = cancel.cancelled() => {
            tracing::info!("cancelled; stopping the command");
            match command.terminate(ctx.settings.kill_grace).await {
                Ok(exit) => tracing::info!(?exit, "command stopped"),
                Err(err) => tracing::warn!(error = %err, "cannot wait for the stopped command"),
            }
            return;
        }
    };
    let stderr_tail = command.stderr_tail(STDERR_PATIENCE).await;
    let exit = match exit {
        Ok(exit) => exit,
        Err(err) => {
            tracing::error!(error = %err, "cannot wait for the command");
            let error = system_error(
                "CommandLost",
                format!("the executor cannot wait for the command: {err}"),
                &ctx.settings.executor_id,
                SystemTime::now(),
            );
            finish(ctx, job, ActionPhase::Failed, Some(error)).await;
            return;
        }
    };
    tracing::info!(?exit, "command exited");
    if cancel.is_cancelled() {
        tracing::info!("cancelled while it ended; not reporting it");
        return;
    }
    if exit.success() {
        finish(ctx, job, ActionPhase::Succeeded, None).await;
    } else {
        let error = command_error(
            exit,
            &stderr_tail,
            &ctx.settings.executor_id,
            SystemTime::now(),
        );
        finish(ctx, job, ActionPhase::Failed, Some(error)).await;
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

/// Reports the terminal phase, with the server's default output_uri.
async fn finish(ctx: &Context, job: &Job, phase: ActionPhase, error: Option<ExecutionError>) {
    let request = FinishRequest {
        executor_id: ctx.settings.executor_id.clone(),
        action_id: Some(job.id.clone()),
        attempt: job.attempt,
        phase: phase as i32,
        output_uri: String::new(),
        error,
    };
    let result = rpc::with_retries("Finish", rpc::report_backoff(), || {
        let mut client = ctx.executor.clone();
        let request = rpc::request(request.clone());
        async move { rpc::call(client.finish(request)).await }
    })
    .await;
    match result {
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
