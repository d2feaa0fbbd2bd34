//! actionsctl: look at and steer actionsd from a terminal. The binary
//! (`src/bin/actionsctl.rs`) parses the command line and calls [`main`].

pub mod cli;
mod enqueue;
pub mod error;
pub mod output;
mod watch;

use std::io::IsTerminal;
use std::time::Duration;

use tonic::transport::Endpoint;

use crate::client::AuthChannel;

use self::cli::{AbortArgs, ActionRef, Cli, Command, Global, LsArgs, RunsArgs, SignalArgs};
use self::error::{error_chain, exit, Failure, Result};
use self::output::{dash, Format};
use crate::proto::actionsd::read::v1 as read;
use crate::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use crate::proto::flyteidl2::actions::{self as actions, action};
use crate::proto::flyteidl2::common::{self, ActionIdentifier, RunIdentifier};
use crate::proto::flyteidl2::{core, workflow};
use read::read_service_client::ReadServiceClient;

/// Runs a parsed command line; returns the process exit code. Errors are
/// printed here, as one line on stderr.
pub async fn main(cli: Cli) -> u8 {
    match run(cli).await {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {failure}");
            failure.exit
        }
    }
}

/// Listings follow at most this many pages with `--all`.
const MAX_PAGES: usize = 1000;

async fn run(cli: Cli) -> Result<u8> {
    let global = cli.global;
    error::set_call_timeout(server_url(&global.server), global.timeout);
    match cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cli::command(), "actionsctl", &mut out);
            output::write_out(&String::from_utf8_lossy(&out))?;
            Ok(exit::OK)
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cli::command())
                .render(&mut out)
                .map_err(|e| Failure::other(format!("cannot render the man page: {e}")))?;
            output::write_out(&String::from_utf8_lossy(&out))?;
            Ok(exit::OK)
        }
        Command::Enqueue(args) => enqueue::run(&global, args).await,
        Command::Get(target) => get(&global, &target).await,
        Command::Ls(args) => ls(&global, args).await,
        Command::Runs(args) => runs(&global, args).await,
        Command::History(target) => history(&global, &target).await,
        Command::DeleteRun(target) => delete_run(&global, &target.run).await,
        Command::Watch(args) => {
            let channel = connect(&global).await?;
            let tty = global.output == Format::Table && std::io::stdout().is_terminal();
            watch::run(&global, ReadServiceClient::new(channel), args, tty).await
        }
        Command::Abort(args) => abort(&global, args).await,
        Command::Signal(args) => signal(&global, args).await,
        Command::Update(args) => update(&global, args).await,
        Command::Health(args) => health(&global, args.wait).await,
    }
}

/// A duration as the flags take it (`2s`, `1m 30s`).
fn flag_duration(duration: Duration) -> String {
    humantime_serde::re::humantime::format_duration(duration).to_string()
}

/// The daemon's URL; `host:port` alone means `http://host:port`.
fn server_url(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

fn endpoint(global: &Global) -> Result<Endpoint> {
    let url = server_url(&global.server);
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(Failure::usage(format!(
            "--server {url:?} is not a valid URL: the scheme must be http or https"
        )));
    }
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure::usage(format!("--server {url:?} is not a valid URL: {e}")))?;
    let endpoint = global
        .security()
        .apply(endpoint, &url)
        .map_err(|e| Failure::usage(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(global.timeout)
        // Keeps an idle `watch` alive through proxies and notices a daemon
        // that went away without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(60))))
}

/// Connects to the daemon, within `--timeout`.
pub(crate) async fn connect(global: &Global) -> Result<AuthChannel> {
    let endpoint = endpoint(global)?;
    let security = global.security();
    let wrap = |channel| {
        security
            .wrap(channel)
            .map_err(|e| Failure::usage(e.to_string()))
    };
    let url = server_url(&global.server);
    // The endpoint's own connect timeout (the same --timeout) usually
    // fires first; either way the failure names the connect timeout.
    match tokio::time::timeout(global.timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => wrap(channel),
        Ok(Err(err)) if !connect_timed_out(&err) => Err(Failure::unavailable(format!(
            "cannot connect to {url}: {}",
            error_chain(&err)
        ))),
        _ => Err(Failure {
            code: Some(tonic::Code::DeadlineExceeded),
            message: format!(
                "cannot connect to {url}: no connection within --timeout {}",
                flag_duration(global.timeout)
            ),
            exit: exit::UNAVAILABLE,
        }),
    }
}

/// Whether connecting failed because the connect timeout expired.
fn connect_timed_out(err: &tonic::transport::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    // Bounded: error chains are short; stop at 16 links regardless.
    for _ in 0..16 {
        let Some(cause) = next else { break };
        // hyper-util reports its connect timeout as an io::Error TimedOut.
        if cause.is::<tokio::time::error::Elapsed>()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// A unary request bounded by `--timeout`.
pub(crate) fn request<T>(global: &Global, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(global.timeout);
    request
}

pub(crate) fn run_id(global: &Global, run: &str) -> RunIdentifier {
    RunIdentifier {
        org: global.org.clone(),
        project: global.project.clone(),
        domain: global.domain.clone(),
        name: run.to_owned(),
    }
}

pub(crate) fn action_id(global: &Global, run: &str, action: &str) -> ActionIdentifier {
    ActionIdentifier {
        run: Some(run_id(global, run)),
        name: action.to_owned(),
    }
}

/// `org/project/domain/run` (org left out when empty).
pub(crate) fn run_path(run: Option<&RunIdentifier>) -> String {
    match run {
        None => "-".to_owned(),
        Some(run) if run.org.is_empty() => {
            format!("{}/{}/{}", run.project, run.domain, run.name)
        }
        Some(run) => format!("{}/{}/{}/{}", run.org, run.project, run.domain, run.name),
    }
}

pub(crate) fn action_path(id: &ActionIdentifier) -> String {
    format!("{}/{}", run_path(id.run.as_ref()), id.name)
}

fn print_ack<M: prost::Message>(
    global: &Global,
    full_name: &str,
    response: &M,
    text: &str,
) -> Result<u8> {
    match global.output {
        Format::Table => output::write_out(&format!("{text}\n"))?,
        format => output::print_message(format, full_name, response)?,
    }
    Ok(exit::OK)
}

async fn get(global: &Global, target: &ActionRef) -> Result<u8> {
    let mut client = ReadServiceClient::new(connect(global).await?);
    let response = client
        .get_action(request(
            global,
            read::GetActionRequest {
                id: Some(action_id(global, &target.run, &target.action)),
            },
        ))
        .await?
        .into_inner();
    if global.output != Format::Table {
        output::print_message(
            global.output,
            "actionsd.read.v1.GetActionResponse",
            &response,
        )?;
        return Ok(exit::OK);
    }
    let summary = response
        .action
        .as_ref()
        .ok_or_else(|| Failure::other("the daemon answered without the action"))?;
    let mut pairs = summary_fields(summary);
    if let Some(spec) = &response.spec {
        pairs.extend(spec_fields(spec));
    }
    output::write_out(&output::fields(&pairs))?;
    Ok(exit::OK)
}

fn summary_fields(a: &read::ActionSummary) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        (
            "Action",
            a.id.as_ref().map(action_path).unwrap_or_else(|| "-".into()),
        ),
        ("Parent", dash(&a.parent_name)),
        ("Kind", output::kind_name(a.kind).to_owned()),
        ("Phase", output::phase_name(a.phase)),
        ("Attempt", a.attempt.to_string()),
        ("Version", a.version.to_string()),
    ];
    if !a.queue.is_empty() {
        pairs.push(("Queue", a.queue.clone()));
    }
    if !a.lease_holder.is_empty() {
        let until = match &a.lease_deadline {
            Some(deadline) => format!(" (lease until {})", output::time(Some(deadline))),
            None => String::new(),
        };
        pairs.push(("Executor", format!("{}{until}", a.lease_holder)));
    }
    if !a.output_uri.is_empty() {
        pairs.push(("Output", a.output_uri.clone()));
    }
    if let Some(error) = &a.error {
        pairs.push(("Error", output::error_text(error)));
    }
    if let Some(value) = &a.signal_value {
        pairs.push(("Signalled", output::literal_text(value)));
    }
    if !a.abort_reason.is_empty() {
        pairs.push(("Abort reason", a.abort_reason.clone()));
    }
    pairs.push(("Created", output::time(a.created_at.as_ref())));
    pairs.push(("Updated", output::time(a.updated_at.as_ref())));
    if a.start_time.is_some() {
        pairs.push(("Started", output::time(a.start_time.as_ref())));
    }
    if a.end_time.is_some() {
        pairs.push(("Ended", output::time(a.end_time.as_ref())));
    }
    if let Some(d) = action_duration(a) {
        pairs.push(("Duration", output::duration(d)));
    }
    if a.deadline.is_some() {
        pairs.push(("Deadline", output::time(a.deadline.as_ref())));
    }
    pairs
}

/// From start (else creation) to end (else now).
fn action_duration(a: &read::ActionSummary) -> Option<Duration> {
    let start = a.start_time.as_ref().or(a.created_at.as_ref());
    let end = if output::is_terminal(a.phase) {
        a.end_time.as_ref().or(a.updated_at.as_ref())
    } else {
        None
    };
    output::elapsed(start, end)
}

fn spec_fields(spec: &actions::Action) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        ("Input", dash(&spec.input_uri)),
        ("Output base", dash(&spec.run_output_base)),
    ];
    match &spec.spec {
        Some(action::Spec::Task(task)) => {
            if let Some(id) = &task.id {
                pairs.push((
                    "Task",
                    format!("{} (version {})", id.name, dash(&id.version)),
                ));
            }
        }
        Some(action::Spec::Condition(condition)) => {
            if let Some(simple) = condition_type(condition) {
                pairs.push(("Waits for", simple.as_str_name().to_lowercase()));
            }
            if !condition.prompt.is_empty() {
                pairs.push(("Prompt", condition.prompt.clone()));
            }
        }
        Some(action::Spec::Trace(trace)) => pairs.push(("Trace", dash(&trace.name))),
        None => {}
    }
    pairs
}

fn condition_type(condition: &workflow::ConditionAction) -> Option<core::SimpleType> {
    match condition.r#type.as_ref()?.r#type.as_ref()? {
        core::literal_type::Type::Simple(simple) => core::SimpleType::try_from(*simple).ok(),
        _ => None,
    }
}

async fn ls(global: &Global, args: LsArgs) -> Result<u8> {
    let mut client = ReadServiceClient::new(connect(global).await?);
    let mut base = read::ListActionsRequest {
        run: args.run.as_deref().map(|run| run_id(global, run)),
        parent_name: args.parent.clone().unwrap_or_default(),
        phases: args.phase.iter().map(|p| p.to_wire()).collect(),
        queue: args.queue.clone().unwrap_or_default(),
        limit: args.paging.limit,
        page_token: args.paging.page_token.clone().unwrap_or_default(),
    };
    let mut all = read::ListActionsResponse::default();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_actions(request(global, base.clone()))
            .await?
            .into_inner();
        all.actions.extend(page.actions);
        all.next_page_token = page.next_page_token;
        if !args.paging.all || all.next_page_token.is_empty() {
            break;
        }
        base.page_token = all.next_page_token.clone();
    }
    if global.output != Format::Table {
        output::print_message(global.output, "actionsd.read.v1.ListActionsResponse", &all)?;
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = all
        .actions
        .iter()
        .map(|a| {
            vec![
                run_path(a.id.as_ref().and_then(|id| id.run.as_ref())),
                a.id.as_ref().map(|id| id.name.clone()).unwrap_or_default(),
                dash(&a.parent_name),
                output::kind_name(a.kind).to_owned(),
                output::phase_name(a.phase),
                a.attempt.to_string(),
                dash(&a.queue),
                action_duration(a)
                    .map(output::duration)
                    .unwrap_or_else(|| "-".into()),
                output::time(a.created_at.as_ref()),
            ]
        })
        .collect();
    output::write_out(&output::table(
        &[
            "RUN", "ACTION", "PARENT", "KIND", "PHASE", "ATTEMPT", "QUEUE", "DURATION", "CREATED",
        ],
        &rows,
    ))?;
    if !all.next_page_token.is_empty() {
        eprintln!("more: add --page-token {} (or --all)", all.next_page_token);
    }
    Ok(exit::OK)
}

async fn runs(global: &Global, args: RunsArgs) -> Result<u8> {
    let mut client = ReadServiceClient::new(connect(global).await?);
    let mut base = read::ListRunsRequest {
        org: global.org.clone(),
        project: global.project.clone(),
        domain: global.domain.clone(),
        limit: args.paging.limit,
        page_token: args.paging.page_token.clone().unwrap_or_default(),
    };
    let mut all = read::ListRunsResponse::default();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_runs(request(global, base.clone()))
            .await?
            .into_inner();
        all.runs.extend(page.runs);
        all.next_page_token = page.next_page_token;
        if !args.paging.all || all.next_page_token.is_empty() {
            break;
        }
        base.page_token = all.next_page_token.clone();
    }
    if global.output != Format::Table {
        output::print_message(global.output, "actionsd.read.v1.ListRunsResponse", &all)?;
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = all
        .runs
        .iter()
        .map(|r| {
            let counts: Vec<String> = r
                .counts
                .iter()
                .map(|c| format!("{} {}", c.count, output::phase_name(c.phase)))
                .collect();
            vec![
                r.id.as_ref().map(|id| id.name.clone()).unwrap_or_default(),
                dash(&r.root_name),
                output::phase_name(r.phase),
                r.actions.to_string(),
                dash(&r.queue),
                output::time(r.created_at.as_ref()),
                counts.join(", "),
            ]
        })
        .collect();
    output::write_out(&output::table(
        &[
            "RUN", "ROOT", "PHASE", "ACTIONS", "QUEUE", "CREATED", "BY PHASE",
        ],
        &rows,
    ))?;
    if !all.next_page_token.is_empty() {
        eprintln!("more: add --page-token {} (or --all)", all.next_page_token);
    }
    Ok(exit::OK)
}

async fn delete_run(global: &Global, run: &str) -> Result<u8> {
    let mut client = ReadServiceClient::new(connect(global).await?);
    let response = client
        .delete_run(request(
            global,
            read::DeleteRunRequest {
                run_id: Some(run_id(global, run)),
            },
        ))
        .await?
        .into_inner();
    if global.output != Format::Table {
        output::print_message(
            global.output,
            "actionsd.read.v1.DeleteRunResponse",
            &response,
        )?;
    } else {
        println!(
            "deleted run {run}: {} actions, {} events",
            response.actions, response.events
        );
    }
    Ok(exit::OK)
}

async fn history(global: &Global, target: &ActionRef) -> Result<u8> {
    let mut client = ReadServiceClient::new(connect(global).await?);
    let response = client
        .get_history(request(
            global,
            read::GetHistoryRequest {
                id: Some(action_id(global, &target.run, &target.action)),
            },
        ))
        .await?
        .into_inner();
    if global.output != Format::Table {
        output::print_message(
            global.output,
            "actionsd.read.v1.GetHistoryResponse",
            &response,
        )?;
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = response
        .events
        .iter()
        .map(|e| {
            let detail = match (&e.error, &e.signal_value) {
                (Some(error), _) => output::error_text(error),
                (None, Some(value)) => format!("value {}", output::literal_text(value)),
                (None, None) => dash(&e.output_uri),
            };
            vec![
                e.version.to_string(),
                output::time(e.time.as_ref()),
                output::phase_name(e.phase),
                e.attempt.to_string(),
                dash(&e.lease_holder),
                dash(&e.changed_by),
                detail,
            ]
        })
        .collect();
    output::write_out(&output::table(
        &[
            "VERSION",
            "TIME",
            "PHASE",
            "ATTEMPT",
            "EXECUTOR",
            "BY",
            "OUTPUT / ERROR",
        ],
        &rows,
    ))?;
    Ok(exit::OK)
}

fn user(subject: Option<&str>) -> Option<common::EnrichedIdentity> {
    let subject = subject.filter(|s| !s.is_empty())?;
    Some(common::EnrichedIdentity {
        principal: Some(common::enriched_identity::Principal::User(common::User {
            id: Some(common::UserIdentifier {
                subject: subject.to_owned(),
            }),
            ..Default::default()
        })),
    })
}

async fn abort(global: &Global, args: AbortArgs) -> Result<u8> {
    let id = action_id(global, &args.target.run, &args.target.action);
    let mut client = ActionsServiceClient::new(connect(global).await?);
    let response = client
        .abort(request(
            global,
            actions::AbortRequest {
                action_id: Some(id.clone()),
                reason: Some(args.reason),
                aborted_by: user(args.by.as_deref()),
            },
        ))
        .await?
        .into_inner();
    print_ack(
        global,
        "flyteidl2.actions.AbortResponse",
        &response,
        &format!("aborted {}", action_path(&id)),
    )
}

async fn signal(global: &Global, args: SignalArgs) -> Result<u8> {
    let id = action_id(global, &args.target.run, &args.target.action);
    let channel = connect(global).await?;
    let (mut value_type, mut parent) = (args.value_type, args.parent.clone());
    if value_type.is_none() || parent.is_none() {
        // Read what the condition declared.
        let response = ReadServiceClient::new(channel.clone())
            .get_action(request(
                global,
                read::GetActionRequest {
                    id: Some(id.clone()),
                },
            ))
            .await?
            .into_inner();
        if parent.is_none() {
            parent = response.action.as_ref().map(|a| a.parent_name.clone());
        }
        if value_type.is_none() {
            let declared = match response.spec.as_ref().and_then(|s| s.spec.as_ref()) {
                Some(action::Spec::Condition(condition)) => condition_type(condition),
                _ => {
                    return Err(Failure {
                        code: Some(tonic::Code::FailedPrecondition),
                        message: format!("{} is not a condition", action_path(&id)),
                        exit: exit::CONFLICT,
                    })
                }
            };
            value_type = Some(match declared {
                Some(core::SimpleType::Boolean) => cli::ValueType::Bool,
                Some(core::SimpleType::Integer) => cli::ValueType::Int,
                Some(core::SimpleType::Float) => cli::ValueType::Float,
                Some(core::SimpleType::String) => cli::ValueType::String,
                _ => {
                    return Err(Failure::invalid(format!(
                        "{} declares no boolean, integer, float or string type; give --type",
                        action_path(&id)
                    )))
                }
            });
        }
    }
    let value_type = value_type.unwrap_or(cli::ValueType::String);
    let literal = parse_value(value_type, &args.value)?;
    let text = output::literal_text(&literal);
    let mut client = ActionsServiceClient::new(channel);
    let response = client
        .signal(request(
            global,
            actions::SignalRequest {
                action_id: Some(id.clone()),
                parent_action_name: parent.unwrap_or_default(),
                value: Some(literal),
                signalled_by: user(args.by.as_deref()),
            },
        ))
        .await?
        .into_inner();
    print_ack(
        global,
        "flyteidl2.actions.SignalResponse",
        &response,
        &format!("signalled {} with {text}", action_path(&id)),
    )
}

/// A primitive literal from the command line.
pub(crate) fn parse_value(value_type: cli::ValueType, text: &str) -> Result<core::Literal> {
    use core::primitive::Value;
    let value = match value_type {
        cli::ValueType::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" => Value::Boolean(true),
            "false" | "no" | "n" | "0" => Value::Boolean(false),
            _ => {
                return Err(Failure::invalid(format!(
                    "value {text:?} is not a boolean (true or false)"
                )))
            }
        },
        cli::ValueType::Int => Value::Integer(
            text.parse()
                .map_err(|_| Failure::invalid(format!("value {text:?} is not an integer")))?,
        ),
        cli::ValueType::Float => Value::FloatValue(
            text.parse()
                .map_err(|_| Failure::invalid(format!("value {text:?} is not a number")))?,
        ),
        cli::ValueType::String => Value::StringValue(text.to_owned()),
    };
    Ok(core::Literal {
        value: Some(core::literal::Value::Scalar(core::Scalar {
            value: Some(core::scalar::Value::Primitive(core::Primitive {
                value: Some(value),
            })),
        })),
        ..Default::default()
    })
}

async fn update(global: &Global, args: cli::UpdateArgs) -> Result<u8> {
    let id = action_id(global, &args.target.run, &args.target.action);
    let mut client = ActionsServiceClient::new(connect(global).await?);
    let response = client
        .update(request(
            global,
            actions::UpdateRequest {
                address: None,
                action_id: Some(id.clone()),
                attempt: args.attempt,
                status: Some(workflow::ActionStatus {
                    phase: args.phase.to_wire(),
                    attempts: args.attempt,
                    ..Default::default()
                }),
            },
        ))
        .await?
        .into_inner();
    print_ack(
        global,
        "flyteidl2.actions.UpdateResponse",
        &response,
        &format!(
            "updated {}: attempt {} {}",
            action_path(&id),
            args.attempt,
            output::phase_name(args.phase.to_wire())
        ),
    )
}

async fn health(global: &Global, wait: Option<Duration>) -> Result<u8> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let url = server_url(&global.server);
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
    let retry = Duration::from_millis(100);
    // Bounded by `--wait`: at most one try per 100 ms until the deadline.
    loop {
        // Each try is bounded by --timeout and by what is left of --wait.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut attempt = global.clone();
        attempt.timeout = global.timeout.min(left.max(retry));
        let outcome: Result<i32> = async {
            let channel = connect(&attempt).await?;
            let response = HealthClient::new(channel)
                .check(request(
                    &attempt,
                    HealthCheckRequest {
                        service: String::new(),
                    },
                ))
                .await?;
            Ok(response.into_inner().status)
        }
        .await;
        let failure = match outcome {
            Ok(status) if status == ServingStatus::Serving as i32 => {
                if global.output == Format::Table {
                    output::write_out(&format!("{url} is serving\n"))?;
                } else {
                    let value = serde_json::json!({ "server": url, "status": "SERVING" });
                    output::write_out(&output::render_document(global.output, &value)?)?;
                }
                return Ok(exit::OK);
            }
            Ok(status) => Failure::unavailable(format!(
                "{url} is not serving ({})",
                ServingStatus::try_from(status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN")
            )),
            Err(failure) => failure,
        };
        if tokio::time::Instant::now() + retry > deadline {
            return Err(match wait {
                // Say that --wait ran out, and how the last try ended.
                Some(wait) => Failure {
                    code: Some(tonic::Code::DeadlineExceeded),
                    message: format!(
                        "{url} did not report SERVING within --wait {}; last try: {}",
                        flag_duration(wait),
                        if failure.code == Some(tonic::Code::DeadlineExceeded) {
                            "no answer in time".to_owned()
                        } else {
                            failure.to_string()
                        }
                    ),
                    exit: exit::UNAVAILABLE,
                },
                None => failure,
            });
        }
        tokio::time::sleep(retry).await;
    }
}
