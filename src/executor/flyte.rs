//! Running a task action as a Flyte task process (`actionsd executor
//! --flyte`): the TaskSpec's container command and arguments, with the
//! placeholders filled in, run directly (no shell); how it ended is read
//! from `<outputPrefix>/error.pb` and the exit status.
//!
//! The enqueued TaskSpec is decoded with a decode-only view of the few
//! flyteidl2 fields the executor reads ([`view`]); the bytes the client
//! sent are never re-encoded.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use prost::Message;

use super::process::Exit;
use crate::proto::flyteidl2::actions::{action, Action};
use crate::proto::flyteidl2::core::{container_error, execution_error::ErrorKind, ExecutionError};

/// The org name handed to the Flyte runtime for a run whose org is empty.
/// flyte 2.12.1's runtime requires a non-empty org; actionsd reads this
/// name back as the empty org wherever an identifier arrives (see
/// `crate::rpc::convert::run_id`), so the process's child actions land in
/// the right run.
pub const EMPTY_ORG_ALIAS: &str = crate::domain::EMPTY_ORG_ALIAS;

/// The start time handed to tasks of a run whose RunSpec names none. It
/// must be the same for every attempt: the SDK hashes it into the names of
/// child actions, and a retried parent must find its children again.
const EPOCH_RFC3339: &str = "1970-01-01T00:00:00Z";

/// A decode-only view of the flyteidl2 messages the executor reads. Field
/// numbers are those of the official flyteidl2 protos
/// (`flyteidl2/task/task_definition.proto`, `flyteidl2/task/run.proto`,
/// `flyteidl2/core/tasks.proto`, `flyteidl2/core/literals.proto`,
/// `flyteidl2/core/errors.proto`); every other field is skipped by prost.
/// Hand-declared (not generated from `proto/`) because actionsd's own
/// protos keep these payloads opaque, and a view used only for decoding
/// needs just these fields.
pub(crate) mod view {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskSpec {
        #[prost(message, optional, tag = "1")]
        pub task_template: Option<TaskTemplate>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskTemplate {
        #[prost(string, tag = "2")]
        pub r#type: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<TaskMetadata>,
        #[prost(message, optional, tag = "6")]
        pub container: Option<Container>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskMetadata {
        #[prost(message, optional, tag = "4")]
        pub timeout: Option<prost_types::Duration>,
        #[prost(message, optional, tag = "5")]
        pub retries: Option<RetryStrategy>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryStrategy {
        #[prost(uint32, tag = "5")]
        pub retries: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, repeated, tag = "2")]
        pub command: Vec<String>,
        #[prost(string, repeated, tag = "3")]
        pub args: Vec<String>,
        #[prost(message, repeated, tag = "5")]
        pub env: Vec<KeyValuePair>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValuePair {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `flyteidl2.task.RunSpec`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunSpec {
        #[prost(message, optional, tag = "3")]
        pub envs: Option<Envs>,
        #[prost(message, optional, tag = "7")]
        pub raw_data_storage: Option<RawDataStorage>,
        #[prost(message, optional, tag = "12")]
        pub run_start_time: Option<prost_types::Timestamp>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Envs {
        #[prost(message, repeated, tag = "1")]
        pub values: Vec<KeyValuePair>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawDataStorage {
        #[prost(string, tag = "1")]
        pub raw_data_prefix: String,
    }

    /// `flyteidl2.core.ErrorDocument`, written by the runtime as
    /// `<outputPrefix>/error.pb`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ErrorDocument {
        #[prost(message, optional, tag = "1")]
        pub error: Option<ContainerError>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerError {
        #[prost(string, tag = "1")]
        pub code: String,
        #[prost(string, tag = "2")]
        pub message: String,
        /// `ContainerError.Kind`: 0 NON_RECOVERABLE, 1 RECOVERABLE.
        #[prost(int32, tag = "3")]
        pub kind: i32,
        /// `ExecutionError.ErrorKind`: 0 UNKNOWN, 1 USER, 2 SYSTEM.
        #[prost(int32, tag = "4")]
        pub origin: i32,
    }
}

/// What the executor takes from a leased task action to run it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Task {
    /// The container's command followed by its arguments, placeholders
    /// not yet filled in.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `metadata.retries.retries`: how many times a recoverable failure is
    /// run again.
    pub retries: u32,
    /// `metadata.timeout`, when positive.
    pub timeout: Option<Duration>,
}

/// Why a leased action cannot run as a Flyte task. Reported as a USER
/// error: the task's definition is at fault, not the executor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum TaskError {
    #[error("the action is not a task action")]
    NotATask,
    #[error("the TaskSpec cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the TaskSpec has no task template")]
    NoTemplate,
    #[error(
        "task type {0:?} is not a container task; the Flyte executor runs container tasks only"
    )]
    NotAContainer(String),
    #[error("the task's container has no command")]
    EmptyCommand,
}

impl TaskError {
    pub(super) fn code(&self) -> &'static str {
        match self {
            TaskError::NotATask => "NotATask",
            TaskError::Undecodable(_) => "InvalidTaskSpec",
            TaskError::NoTemplate => "NoTaskTemplate",
            TaskError::NotAContainer(_) => "UnsupportedTaskType",
            TaskError::EmptyCommand => "EmptyCommand",
        }
    }
}

/// The code bundle a task's container unpacks (the value of its `--tgz`
/// or `--pkl` argument), if it names one.
pub(crate) fn code_bundle(action: &Action) -> Option<String> {
    let Some(action::Spec::Task(task)) = &action.spec else {
        return None;
    };
    let container = view::TaskSpec::decode(task.spec.clone())
        .ok()?
        .task_template?
        .container?;
    let args = container.command.iter().chain(&container.args);
    args.clone()
        .zip(args.skip(1))
        .find(|(flag, _)| *flag == "--tgz" || *flag == "--pkl")
        .map(|(_, uri)| uri.clone())
}

/// Decodes the task of an enqueued action.
pub(super) fn task(action: &Action) -> Result<Task, TaskError> {
    let Some(action::Spec::Task(task)) = &action.spec else {
        return Err(TaskError::NotATask);
    };
    let spec = view::TaskSpec::decode(task.spec.clone())
        .map_err(|e| TaskError::Undecodable(e.to_string()))?;
    let template = spec.task_template.ok_or(TaskError::NoTemplate)?;
    let Some(container) = template.container else {
        return Err(TaskError::NotAContainer(template.r#type));
    };
    let argv: Vec<String> = container
        .command
        .into_iter()
        .chain(container.args)
        .collect();
    if argv.first().is_none_or(|program| program.is_empty()) {
        return Err(TaskError::EmptyCommand);
    }
    let metadata = template.metadata.unwrap_or_default();
    let timeout = metadata
        .timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero());
    Ok(Task {
        argv,
        env: container
            .env
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect(),
        retries: metadata.retries.map_or(0, |r| r.retries),
        timeout,
    })
}

/// The run-wide settings of a RunSpec that reach every task process.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct RunSettings {
    pub envs: Vec<(String, String)>,
    pub raw_data_prefix: Option<String>,
    pub start_time: Option<String>,
}

/// Reads the RunSpec handed out with a lease; an undecodable or empty one
/// gives the defaults.
pub(super) fn run_settings(run_spec: &[u8]) -> RunSettings {
    let Ok(spec) = view::RunSpec::decode(run_spec) else {
        return RunSettings::default();
    };
    RunSettings {
        envs: spec
            .envs
            .map(|e| e.values.into_iter().map(|kv| (kv.key, kv.value)).collect())
            .unwrap_or_default(),
        raw_data_prefix: spec
            .raw_data_storage
            .map(|r| r.raw_data_prefix)
            .filter(|p| !p.is_empty()),
        start_time: spec
            .run_start_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
    }
}

/// Where one attempt reads and writes, and the names it runs under.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Placeholders {
    pub input: String,
    pub input_prefix: String,
    pub output_prefix: String,
    pub raw_output_data_prefix: String,
    pub checkpoint_output_prefix: String,
    pub prev_checkpoint_prefix: String,
    pub run_name: String,
    pub action_name: String,
    pub run_start_time: String,
    pub per_retry_unique_key: String,
}

impl Placeholders {
    /// `output_uri` is the attempt's output location,
    /// `<run_output_base>/<action>/<attempt>`.
    pub(super) fn new(
        action: &Action,
        run: &RunSettings,
        run_name: &str,
        action_name: &str,
        attempt: u32,
        output_uri: &str,
    ) -> Self {
        let base = action.run_output_base.trim_end_matches('/');
        let attempt_dir = |attempt: u32| format!("{base}/{action_name}/{attempt}");
        let raw = match &run.raw_data_prefix {
            Some(prefix) => format!(
                "{}/{run_name}/{action_name}/{attempt}",
                prefix.trim_end_matches('/')
            ),
            None => format!("{output_uri}/raw"),
        };
        let input_prefix = match action.input_uri.rsplit_once('/') {
            Some((dir, _)) => dir.to_owned(),
            None => String::new(),
        };
        Self {
            input: action.input_uri.clone(),
            input_prefix,
            output_prefix: output_uri.to_owned(),
            raw_output_data_prefix: raw,
            checkpoint_output_prefix: format!("{}/checkpoint", attempt_dir(attempt)),
            prev_checkpoint_prefix: if attempt > 1 {
                format!("{}/checkpoint", attempt_dir(attempt - 1))
            } else {
                String::new()
            },
            run_name: run_name.to_owned(),
            action_name: action_name.to_owned(),
            run_start_time: run
                .start_time
                .clone()
                .unwrap_or_else(|| EPOCH_RFC3339.to_owned()),
            per_retry_unique_key: format!("{run_name}-{action_name}-{attempt}"),
        }
    }

    /// The value of a placeholder name (matched case-insensitively, as
    /// upstream does), if it is one the executor knows.
    fn value(&self, name: &str) -> Option<&str> {
        let value = match name.to_ascii_lowercase().as_str() {
            "input" => &self.input,
            "inputprefix" => &self.input_prefix,
            "outputprefix" => &self.output_prefix,
            "rawoutputdataprefix" => &self.raw_output_data_prefix,
            "checkpointoutputprefix" => &self.checkpoint_output_prefix,
            "prevcheckpointprefix" => &self.prev_checkpoint_prefix,
            "runname" => &self.run_name,
            "actionname" => &self.action_name,
            "runstarttime" => &self.run_start_time,
            "perretryuniquekey" | "podname" => &self.per_retry_unique_key,
            _ => return None,
        };
        Some(value)
    }

    /// Fills in every `{{.name}}` (or `{{ .name }}`, `{{$name}}`) the
    /// executor knows; others are left as they are. Hand-written rather
    /// than a template engine: the syntax is Go's, and only plain names
    /// are substituted.
    pub(super) fn fill(&self, arg: &str) -> String {
        let mut out = String::with_capacity(arg.len());
        let mut rest = arg;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                out.push_str(&rest[open..]);
                return out;
            };
            let inner = after[..close].trim();
            let name = inner.strip_prefix('.').or_else(|| inner.strip_prefix('$'));
            match name.and_then(|name| self.value(name)) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[open..open + 2 + close + 2]),
            }
            rest = &after[close + 2..];
        }
        out.push_str(rest);
        out
    }
}

/// The identity of an attempt, as the runtime's environment names it.
pub(super) struct Identity<'a> {
    pub org: &'a str,
    pub project: &'a str,
    pub domain: &'a str,
    pub run: &'a str,
    pub action: &'a str,
    pub run_output_base: &'a str,
}

/// The variable holding a task's run-scoped credential, printed by the
/// SDK's external token command.
pub(crate) const TASK_TOKEN_VAR: &str = "ACTIONSD_TASK_TOKEN";

/// The task process's environment, added to the executor's own, in order
/// (a later entry wins): the container's `env`, the run's `RunSpec.envs`,
/// then what the runtime needs to find actionsd and its action.
///
/// With a task credential (the daemon requires authentication), the SDK
/// inside the task authenticates with it:
/// - when the server is `https://HOST` on the default port, as the in-task
///   API key `_UNION_EAGER_API_KEY` (base64 of `HOST:client id:secret:org`;
///   the SDK splits it at colons, so it cannot carry a port or scheme),
///   which the SDK exchanges at the token endpoint (client-credentials);
/// - otherwise through `FLYTE_AUTH_TYPE=ExternalCommand`, whose command
///   prints the credential (`printenv ACTIONSD_TASK_TOKEN`); actionsd takes
///   it as a bearer token directly. `_U_INSECURE` is not set then: the SDK
///   sends no credentials on a channel it was told is insecure; the
///   `http://` scheme of the endpoint alone selects plain HTTP.
pub(super) fn environment(
    task: &Task,
    run: &RunSettings,
    who: &Identity<'_>,
    server: &str,
    credential: Option<&crate::proto::actionsd::executor::v1::TaskCredential>,
) -> Vec<(String, String)> {
    let org = if who.org.is_empty() {
        EMPTY_ORG_ALIAS
    } else {
        who.org
    };
    let mut env: Vec<(String, String)> = task.env.clone();
    env.extend(run.envs.iter().cloned());
    let runtime = [
        ("_U_EP_OVERRIDE", server),
        ("_U_USE_ACTIONS", "1"),
        ("_U_ORG_NAME", org),
        ("FLYTE_INTERNAL_EXECUTION_PROJECT", who.project),
        ("FLYTE_INTERNAL_EXECUTION_DOMAIN", who.domain),
        ("_U_RUN_BASE", who.run_output_base),
        ("RUN_NAME", who.run),
        ("ACTION_NAME", who.action),
        // Local storage: the parent writes each child's inputs.pb into a
        // directory that does not exist yet; fsspec's local filesystem
        // creates parent directories when told to.
        ("FSSPEC_FILE", r#"{"auto_mkdir": true}"#),
        ("FSSPEC_LOCAL", r#"{"auto_mkdir": true}"#),
    ];
    env.extend(
        runtime
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    match credential {
        None => {
            if server.starts_with("http://") {
                env.push(("_U_INSECURE".to_owned(), "true".to_owned()));
            }
        }
        Some(credential) => {
            let host = server
                .strip_prefix("https://")
                .map(|h| h.trim_end_matches('/'))
                .filter(|h| !h.is_empty() && !h.contains([':', '/']));
            match host {
                Some(host) => {
                    use base64::Engine as _;
                    let key = format!(
                        "{host}:{}:{}:{org}",
                        credential.client_id, credential.client_secret
                    );
                    env.push((
                        "_UNION_EAGER_API_KEY".to_owned(),
                        base64::engine::general_purpose::STANDARD.encode(key),
                    ));
                }
                None => {
                    env.push(("FLYTE_AUTH_TYPE".to_owned(), "ExternalCommand".to_owned()));
                    env.push((
                        "FLYTE_AUTH_COMMAND".to_owned(),
                        format!(r#"["printenv", "{TASK_TOKEN_VAR}"]"#),
                    ));
                    env.push((TASK_TOKEN_VAR.to_owned(), credential.client_secret.clone()));
                }
            }
        }
    }
    env
}

/// Where the system's CA bundle usually is (the first that exists is
/// used), as OpenSSL and rustls-native-certs look for it.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A CA bundle for task processes (`SSL_CERT_FILE`): the system's roots
/// plus `ca`, written once into `dir` (replaced atomically when `ca`
/// changes). `SSL_CERT_FILE` replaces the trust store, so the system's
/// roots are kept in it for whatever else the task reaches over TLS.
pub(super) fn trust_bundle(ca: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let mut bundle = SYSTEM_BUNDLES
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend(std::fs::read(ca)?);
    std::fs::create_dir_all(dir)?;
    let path = dir.join("trust.pem");
    if std::fs::read(&path).ok().as_deref() != Some(bundle.as_slice()) {
        let partial = dir.join(format!("trust.pem.{}", std::process::id()));
        std::fs::write(&partial, &bundle)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(path)
}

/// A local path for a storage location: a plain path or a `file://` URI.
/// Other schemes (object stores) are not readable by the executor.
pub(super) fn local_path(uri: &str) -> Option<PathBuf> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    if uri.contains("://") {
        return None;
    }
    Some(PathBuf::from(uri))
}

/// How a finished task process ended, as the executor reports it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    Succeeded,
    /// Failed; `retry` when the error is recoverable and retries are left.
    Failed {
        error: ExecutionError,
        retry: bool,
    },
}

/// Reads `<outputPrefix>/error.pb`, if the runtime wrote one.
pub(super) fn read_error(output_prefix: &str) -> std::io::Result<Option<(PathBuf, Vec<u8>)>> {
    let Some(dir) = local_path(output_prefix) else {
        return Ok(None);
    };
    let path = dir.join("error.pb");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some((path, bytes))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Any protobuf message: decoding into it checks only that the bytes are
/// well-formed (every field complete), which a truncated file is not.
#[derive(Clone, PartialEq, prost::Message)]
struct WellFormed {}

/// Whether the runtime wrote a complete `<outputPrefix>/outputs.pb`. The
/// runtime writes it as the task's last step, after the user's function
/// returned; only local storage is looked at.
pub(super) fn outputs_written(output_prefix: &str) -> bool {
    let Some(dir) = local_path(output_prefix) else {
        return false;
    };
    std::fs::read(dir.join("outputs.pb"))
        .is_ok_and(|bytes| WellFormed::decode(bytes.as_slice()).is_ok())
}

/// Judges a task process that exited by itself, by what the runtime wrote
/// first and the exit status second: `error.pb` (`error_doc`, its content
/// and where it was read) is a failure; a complete `outputs.pb`
/// (`outputs_written`) is a success even when the process then died (the
/// interpreter can crash while it shuts down, after the task's result is
/// whole); otherwise the exit status decides.
#[allow(clippy::too_many_arguments)]
pub(super) fn outcome(
    exit: Exit,
    error_doc: Option<(&Path, &[u8])>,
    outputs_written: bool,
    stderr_tail: &str,
    attempt: u32,
    retries: u32,
    worker: &str,
    now: SystemTime,
) -> Outcome {
    if let Some((path, bytes)) = error_doc {
        let error = match view::ErrorDocument::decode(bytes) {
            Ok(doc) => doc.error.unwrap_or_default(),
            Err(err) => view::ContainerError {
                code: "InvalidErrorDocument".to_owned(),
                message: format!("the task wrote an error.pb that cannot be decoded: {err}"),
                kind: container_error::Kind::NonRecoverable as i32,
                origin: ErrorKind::System as i32,
            },
        };
        let recoverable = error.kind == container_error::Kind::Recoverable as i32;
        let kind = match ErrorKind::try_from(error.origin) {
            Ok(ErrorKind::System) => ErrorKind::System,
            _ => ErrorKind::User,
        };
        return Outcome::Failed {
            retry: recoverable && attempt <= retries,
            error: ExecutionError {
                code: error.code,
                message: error.message,
                error_uri: format!("file://{}", path.display()),
                kind: kind as i32,
                timestamp: Some(now.into()),
                worker: worker.to_owned(),
                recoverability: error.kind,
                ..ExecutionError::default()
            },
        };
    }
    if exit.success() || outputs_written {
        return Outcome::Succeeded;
    }
    let (code, what) = match exit {
        Exit::Code(n) => (
            format!("ExitCode{n}"),
            format!("the task process exited with status {n} without writing error.pb"),
        ),
        Exit::Signal(n) => (
            format!("Signal{n}"),
            format!("the task process was killed by signal {n} without writing error.pb"),
        ),
    };
    let message = if stderr_tail.is_empty() {
        what
    } else {
        format!("{what}: {stderr_tail}")
    };
    Outcome::Failed {
        retry: false,
        error: ExecutionError {
            code,
            message,
            kind: ErrorKind::System as i32,
            timestamp: Some(now.into()),
            worker: worker.to_owned(),
            ..ExecutionError::default()
        },
    }
}

/// The error of an attempt stopped at its timeout.
pub(super) fn timeout_error(timeout: Duration, worker: &str, now: SystemTime) -> ExecutionError {
    ExecutionError {
        code: "Timeout".to_owned(),
        message: format!(
            "the task ran longer than its timeout of {} and was stopped",
            humantime_serde::re::humantime::format_duration(timeout)
        ),
        kind: ErrorKind::User as i32,
        timestamp: Some(now.into()),
        worker: worker.to_owned(),
        ..ExecutionError::default()
    }
}

/// Resolves the program of a task: a bare name is looked up first in
/// `flyte_bin` (the environment whose `a0` should run), then on `PATH`
/// (done by the OS at spawn).
pub(super) fn program(argv0: &str, flyte_bin: Option<&Path>) -> PathBuf {
    if !argv0.contains('/') {
        if let Some(dir) = flyte_bin {
            let candidate = dir.join(argv0);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(argv0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flyteidl2::workflow::TaskAction;

    fn action_with(spec: &view::TaskSpec) -> Action {
        Action {
            input_uri: "/data/r1/abc/inputs.pb".into(),
            run_output_base: "/data/r1/".into(),
            spec: Some(action::Spec::Task(TaskAction {
                spec: spec.encode_to_vec().into(),
                ..TaskAction::default()
            })),
            ..Action::default()
        }
    }

    fn container_spec() -> view::TaskSpec {
        view::TaskSpec {
            task_template: Some(view::TaskTemplate {
                r#type: "python".into(),
                metadata: Some(view::TaskMetadata {
                    timeout: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 0,
                    }),
                    retries: Some(view::RetryStrategy { retries: 2 }),
                }),
                container: Some(view::Container {
                    command: vec![],
                    args: vec!["a0".into(), "--inputs".into(), "{{.input}}".into()],
                    env: vec![view::KeyValuePair {
                        key: "A".into(),
                        value: "container".into(),
                    }],
                }),
            }),
        }
    }

    #[test]
    fn a_container_task_decodes_to_its_command_retries_and_timeout() {
        let task = task(&action_with(&container_spec())).unwrap();
        assert_eq!(task.argv, ["a0", "--inputs", "{{.input}}"]);
        assert_eq!(task.retries, 2);
        assert_eq!(task.timeout, Some(Duration::from_secs(3)));
        assert_eq!(task.env, [("A".to_owned(), "container".to_owned())]);
    }

    #[test]
    fn a_task_without_a_container_names_its_type() {
        let mut spec = container_spec();
        let template = spec.task_template.as_mut().unwrap();
        template.container = None;
        template.r#type = "spark".into();
        let err = task(&action_with(&spec)).unwrap_err();
        assert_eq!(err, TaskError::NotAContainer("spark".into()));
        assert!(err.to_string().contains("\"spark\""));
    }

    #[test]
    fn placeholders_are_filled_case_insensitively_and_unknown_ones_kept() {
        let action = action_with(&container_spec());
        let run = RunSettings::default();
        let p = Placeholders::new(&action, &run, "r1", "abc", 2, "/data/r1/abc/2");
        assert_eq!(p.fill("{{.input}}"), "/data/r1/abc/inputs.pb");
        assert_eq!(p.fill("{{ .InputPrefix }}"), "/data/r1/abc");
        assert_eq!(p.fill("{{.outputPrefix}}/x"), "/data/r1/abc/2/x");
        assert_eq!(p.fill("{{.rawOutputDataPrefix}}"), "/data/r1/abc/2/raw");
        assert_eq!(
            p.fill("{{.checkpointOutputPrefix}}"),
            "/data/r1/abc/2/checkpoint"
        );
        assert_eq!(
            p.fill("{{.prevCheckpointPrefix}}"),
            "/data/r1/abc/1/checkpoint"
        );
        assert_eq!(p.fill("{{.runName}}-{{.actionName}}"), "r1-abc");
        assert_eq!(p.fill("{{.runStartTime}}"), EPOCH_RFC3339);
        assert_eq!(
            p.fill("{{.inputs.x}} {{.unknown"),
            "{{.inputs.x}} {{.unknown"
        );
        let first = Placeholders::new(&action, &run, "r1", "abc", 1, "/data/r1/abc/1");
        assert_eq!(first.fill("{{.prevCheckpointPrefix}}"), "");
    }

    #[test]
    fn the_run_spec_gives_envs_raw_prefix_and_start_time() {
        let spec = view::RunSpec {
            envs: Some(view::Envs {
                values: vec![view::KeyValuePair {
                    key: "A".into(),
                    value: "run".into(),
                }],
            }),
            raw_data_storage: Some(view::RawDataStorage {
                raw_data_prefix: "/raw/".into(),
            }),
            run_start_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        };
        let run = run_settings(&spec.encode_to_vec());
        assert_eq!(run.start_time.as_deref(), Some("2023-11-14T22:13:20+00:00"));
        let action = action_with(&container_spec());
        let p = Placeholders::new(&action, &run, "r1", "abc", 1, "/data/r1/abc/1");
        assert_eq!(p.raw_output_data_prefix, "/raw/r1/abc/1");
        let task = task(&action).unwrap();
        let who = Identity {
            org: "",
            project: "p",
            domain: "d",
            run: "r1",
            action: "abc",
            run_output_base: "/data/r1",
        };
        let env = environment(&task, &run, &who, "http://127.0.0.1:1", None);
        let last = |key: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("A"), Some("run"));
        assert_eq!(last("_U_ORG_NAME"), Some(EMPTY_ORG_ALIAS));
        assert_eq!(last("_U_EP_OVERRIDE"), Some("http://127.0.0.1:1"));
        assert_eq!(last("RUN_NAME"), Some("r1"));
        assert_eq!(last("_U_INSECURE"), Some("true"));

        // With a task credential: on a port, the SDK's external token
        // command, and no `_U_INSECURE` (the SDK would send no token).
        let credential = crate::proto::actionsd::executor::v1::TaskCredential {
            client_id: "actionsd-task".into(),
            client_secret: "the.task.key".into(),
        };
        let env = environment(&task, &run, &who, "https://127.0.0.1:1", Some(&credential));
        let get = |key: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("FLYTE_AUTH_TYPE").as_deref(), Some("ExternalCommand"));
        assert_eq!(
            get("FLYTE_AUTH_COMMAND").as_deref(),
            Some(r#"["printenv", "ACTIONSD_TASK_TOKEN"]"#)
        );
        assert_eq!(get(TASK_TOKEN_VAR).as_deref(), Some("the.task.key"));
        assert_eq!(get("_U_INSECURE"), None);
        assert_eq!(get("_UNION_EAGER_API_KEY"), None);
        // On https's own port: the in-task API key, as the SDK decodes it.
        let env = environment(
            &task,
            &run,
            &who,
            "https://actionsd.example",
            Some(&credential),
        );
        let key = env
            .iter()
            .find(|(k, _)| k == "_UNION_EAGER_API_KEY")
            .map(|(_, v)| v.clone())
            .expect("an API key");
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        let parts: Vec<&str> = std::str::from_utf8(&decoded)
            .unwrap()
            .splitn(4, ':')
            .collect();
        assert_eq!(
            parts,
            [
                "actionsd.example",
                "actionsd-task",
                "the.task.key",
                EMPTY_ORG_ALIAS
            ]
        );
        assert!(!env.iter().any(|(k, _)| k == "FLYTE_AUTH_TYPE"));
    }

    #[test]
    fn an_error_document_fails_the_attempt_and_a_recoverable_one_retries() {
        let doc = view::ErrorDocument {
            error: Some(view::ContainerError {
                code: "ValueError".into(),
                message: "boom".into(),
                kind: container_error::Kind::Recoverable as i32,
                origin: ErrorKind::User as i32,
            }),
        }
        .encode_to_vec();
        let path = Path::new("/o/error.pb");
        let now = SystemTime::now();
        let judged = outcome(Exit::Code(0), Some((path, &doc)), false, "", 1, 1, "w", now);
        let Outcome::Failed { error, retry } = judged else {
            panic!("not failed: {judged:?}");
        };
        assert!(retry);
        assert_eq!(error.code, "ValueError");
        assert_eq!(error.message, "boom");
        assert_eq!(error.kind, ErrorKind::User as i32);
        assert_eq!(error.error_uri, "file:///o/error.pb");
        // The last attempt is not retried.
        let last = outcome(Exit::Code(0), Some((path, &doc)), false, "", 2, 1, "w", now);
        assert!(matches!(last, Outcome::Failed { retry: false, .. }));
    }

    #[test]
    fn a_crash_without_an_error_document_is_a_system_error() {
        let judged = outcome(
            Exit::Code(3),
            None,
            false,
            "Traceback",
            1,
            5,
            "w",
            SystemTime::now(),
        );
        let Outcome::Failed { error, retry } = judged else {
            panic!("not failed");
        };
        assert!(!retry);
        assert_eq!(error.kind, ErrorKind::System as i32);
        assert_eq!(error.code, "ExitCode3");
        assert!(error.message.ends_with(": Traceback"));
        assert_eq!(
            outcome(Exit::Code(0), None, false, "", 1, 0, "w", SystemTime::now()),
            Outcome::Succeeded
        );
    }

    #[test]
    fn complete_outputs_stand_when_the_process_dies_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().to_str().unwrap().to_owned();
        assert!(!outputs_written(&prefix), "no outputs.pb yet");
        // A LiteralMap-shaped message: field 1, length 3, three bytes.
        std::fs::write(
            dir.path().join("outputs.pb"),
            [0x0a, 0x03, 0x0a, 0x01, 0x78],
        )
        .unwrap();
        assert!(outputs_written(&prefix));
        let judged = outcome(
            Exit::Signal(6),
            None,
            true,
            "Fatal Python error",
            1,
            0,
            "w",
            SystemTime::now(),
        );
        assert_eq!(judged, Outcome::Succeeded);
        // Cut short: the length says three bytes, one is there.
        std::fs::write(dir.path().join("outputs.pb"), [0x0a, 0x03, 0x0a]).unwrap();
        assert!(
            !outputs_written(&prefix),
            "a truncated outputs.pb is not a result"
        );
        let judged = outcome(
            Exit::Signal(6),
            None,
            false,
            "Fatal Python error",
            1,
            0,
            "w",
            SystemTime::now(),
        );
        assert!(matches!(judged, Outcome::Failed { retry: false, .. }));
    }

    #[test]
    fn only_local_locations_are_readable() {
        assert_eq!(local_path("file:///a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(local_path("/a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(local_path("s3://bucket/a"), None);
    }
}
